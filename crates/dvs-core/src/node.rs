//! The node kernel core: M3-IPC semantics over local connections and peer links.
//!
//! Inputs are method calls (`on_*`, [`NodeCore::handle_timeout`]) carrying the current time;
//! outputs are [`Action`]s taken with [`NodeCore::poll_action`]. Every local request gets
//! exactly one [`LocalAction::Respond`], possibly much later (blocking calls).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::message::NOTIFY_MTYPE;
use dvs_wire::peer::{
    Bound, BulkFrame, Cancel, Deliver, Delivered, ImageChunk, IpcFrame, MigrCommit, MigrDone,
    MigrFrame, MigrPrepare, MigrRestore, MigrRestored, MigrRollback, MigrStart, MigrStartAck,
    Notify, Redirect, Reply, Unbound, VcopyData, VcopyDone, VcopyPull,
};
use dvs_wire::peer::{DeliverKind, MigrationId, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, Message, NodeId, Timeout, PROTOCOL_VERSION};

use crate::table::{EndpointTable, Registration};
use crate::{ConnId, OpId};

pub mod action;
pub mod input;
pub mod migration;
pub mod peer_check;
pub use action::{
    Action, DirRequest, LocalAction, MemoryAction, PeerAction, ProcessAction, Report,
    VcopyCompletion,
};
pub use input::{DirectoryInput, Input, MigrationInput, Ticket};
use migration::MigrationState;
use peer_check::{IncomingKey, IncomingVcopy, Verdict};

/// Largest `vcopy` in one call.
pub const VCOPY_MAX: u64 = 16 << 20;

/// Extra time a caller waits for a remote node's own timeout verdict before giving up locally.
const REMOTE_GRACE: Duration = Duration::from_millis(200);

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

/// Where a queued message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Local(ConnId),
    Remote { node: NodeId, op: OpId },
}

/// A message waiting for its receiver to take it.
#[derive(Clone, Debug)]
struct Incoming {
    src: Ep,
    msg: Message,
    kind: DeliverKind,
    origin: Origin,
}

/// Whom a process owes a reply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyTo {
    Local(ConnId),
    Remote(NodeId),
}

/// What a local process is blocked in.
#[derive(Clone, Debug, PartialEq)]
enum Blocked {
    /// Not in a call (or in a call that completes at once).
    No,
    /// Its message waits in the queue of a local endpoint.
    SendingLocal {
        dst: Ep,
        kind: DeliverKind,
        msg: Message,
        timeout: Timeout,
    },
    /// Its message went to another node (op outstanding).
    SendingRemote {
        dst: Ep,
        node: NodeId,
        op: OpId,
        kind: DeliverKind,
        msg: Message,
        timeout: Timeout,
    },
    /// Its request waits for a migration's outcome (of its peer, or of itself).
    Held { req: LocalRequest },
    /// Cooperative migration: asked for its snapshot.
    Snapshotting,
    /// Restored on this node as the destination of a migration; waits for the commit.
    Installing { id: MigrationId },
    /// Waiting for a reply from `from` (its sendrec message was taken).
    AwaitingReply { from: Ep },
    /// In receive.
    Receiving { src: Source },
    /// In vcopy.
    Vcopy { op: OpId },
    /// In wait_for_bind.
    WaitingBind { ep: Ep },
    /// Waiting for the directory to say where an endpoint runs; the request is re-run then.
    LookingUp { ep: Ep, req: LocalRequest },
    /// Waiting for the directory to accept its registration.
    Binding,
    /// Waiting for the directory to forget its endpoint.
    Unbinding,
}

struct Conn {
    pid: i32,
    /// Uid and launch record of the process, for the bind permission check.
    uid: u32,
    launched_for: Option<(DcId, Ep)>,
    bound: Option<(DcId, Ep)>,
    blocked: Blocked,
    /// Deadline of the current call; a fresh generation invalidates older timers.
    deadline: Option<Instant>,
    gen: u64,
    queue: VecDeque<Incoming>,
    notifies: BTreeMap<Ep, u64>,
    owes_reply: HashMap<Ep, ReplyTo>,
    /// Set while this endpoint migrates away: nothing enters or leaves it.
    migrating_out: Option<MigrationId>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// A local caller's vcopy; `nodes`: the other nodes it depends on.
    Vcopy {
        conn: ConnId,
        nodes: [Option<NodeId>; 2],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Conn { conn: ConnId, gen: u64 },
    Incoming { node: NodeId, op: OpId },
    Migration { id: MigrationId },
}

/// The core of one node kernel.
pub struct NodeCore {
    node: NodeId,
    dcs: HashMap<DcId, DcInfo>,
    table: EndpointTable,
    conns: HashMap<ConnId, Conn>,
    links_up: HashSet<NodeId>,
    ops: HashMap<OpId, Op>,
    next_op: OpId,
    /// Queued messages from other nodes, by origin, to find them on `Cancel` or timeout.
    remote_incoming: HashMap<(NodeId, OpId), (DcId, Ep)>,
    /// Local callers blocked on a message sent to another node, by (node, op).
    remote_sends: HashMap<(NodeId, OpId), ConnId>,
    /// Remote sendrecs abandoned by their caller, by (node, op), until that node acknowledges
    /// the `Cancel`: a `Reply` from `server` to `client` meanwhile answers one of them, not a
    /// later sendrec of the same pair (`Reply` carries no op). Value: (dc, client, server).
    abandoned: HashMap<(NodeId, OpId), (DcId, Ep, Ep)>,
    /// Sendrecs of remote callers taken here and not replied to yet, (dc, server, client) ->
    /// (caller's node, op): a `Cancel` of that op means the caller is not waiting any more.
    remote_callers: HashMap<(DcId, Ep, Ep), (NodeId, OpId)>,
    lookups: HashMap<(DcId, Ep), Vec<ConnId>>,
    bind_waiters: HashMap<(DcId, Ep), Vec<ConnId>>,
    /// Vcopies streaming into this node, until their last chunk (see `peer_check`).
    vcopy_in: HashMap<IncomingKey, IncomingVcopy>,
    vcopy_seq: u64,
    /// Peers that sent a forged frame; their frames are dropped until the link is new.
    condemned: HashSet<NodeId>,
    timers: BTreeSet<(Instant, u64, TimerKey)>,
    timer_seq: u64,
    actions: VecDeque<Action>,
    migr: MigrationState,
    /// Time of the latest event, for the few inputs that carry none (link down, snapshot).
    last_now: Option<Instant>,
}

fn err(e: Errno) -> LocalResponse {
    LocalResponse::Err(e)
}

impl NodeCore {
    /// A core for node `cfg.node` with no connections and no registrations.
    pub fn new(cfg: CoreConfig) -> Self {
        let mut core = NodeCore {
            node: cfg.node,
            dcs: cfg.dcs.into_iter().map(|d| (d.id, d)).collect(),
            table: EndpointTable::default(),
            conns: HashMap::new(),
            links_up: HashSet::new(),
            ops: HashMap::new(),
            next_op: 1,
            remote_incoming: HashMap::new(),
            remote_sends: HashMap::new(),
            abandoned: HashMap::new(),
            remote_callers: HashMap::new(),
            lookups: HashMap::new(),
            bind_waiters: HashMap::new(),
            vcopy_in: HashMap::new(),
            vcopy_seq: 0,
            condemned: HashSet::new(),
            timers: BTreeSet::new(),
            timer_seq: 0,
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
        }
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

    /// The time of the latest event handled, if any.
    pub fn last_event_time(&self) -> Option<Instant> {
        self.last_now
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
        self.timers.first().map(|(t, _, _)| *t)
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

    /// A process connected; `peer` says who it is (pid as seen by the node kernel, uid, and
    /// the endpoint it was launched for).
    fn on_local_connect(&mut self, conn: ConnId, peer: LocalPeer) {
        self.conns.insert(
            conn,
            Conn {
                pid: peer.pid,
                uid: peer.uid,
                launched_for: peer.launched_for,
                bound: None,
                blocked: Blocked::No,
                deadline: None,
                gen: 0,
                queue: VecDeque::new(),
                notifies: BTreeMap::new(),
                owes_reply: HashMap::new(),
                migrating_out: None,
            },
        );
    }

    /// A process disconnected (exited, died, or its connection was closed).
    fn on_local_disconnect(&mut self, conn: ConnId) {
        self.abandon_call(conn);
        self.release_endpoint(conn, Errno::DstDied);
        self.conns.remove(&conn);
    }

    /// A request from a local process.
    fn on_local_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        self.local_request(conn, req, now);
        self.check_quiescence(now);
    }

    fn local_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match (&c.blocked, &req) {
            (Blocked::Snapshotting, LocalRequest::Snapshot { data }) => {
                let data = data.clone();
                return self.on_snapshot(conn, data);
            }
            (
                Blocked::No,
                LocalRequest::BindRestored {
                    version,
                    dc,
                    ep,
                    migration,
                },
            ) => {
                let (version, dc, ep, migration) = (*version, *dc, *ep, *migration);
                // The same rule as `bind`: only the restarted program may take the endpoint.
                if self.bind_refused(conn, dc, ep) {
                    return self.respond(conn, err(Errno::Permission));
                }
                return self.on_bind_restored(conn, version, dc, ep, migration);
            }
            // Its endpoint is migrating away and owes no reply: the call waits for the outcome,
            // and the process is now quiescent (blocked in IPC). While it owes a reply its calls
            // run, so that it can finish serving (vcopy, reply) and get there.
            (Blocked::No, _) if c.migrating_out.is_some() && c.owes_reply.is_empty() => {
                self.reblock(conn, Blocked::Held { req });
                return;
            }
            _ => {}
        }
        if c.blocked != Blocked::No {
            self.actions.push_back(Action::Local(LocalAction::Close {
                conn,
                reason: "request while a previous call is still in progress".into(),
            }));
            return;
        }
        self.run_request(conn, req, now);
    }

    fn run_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        match req {
            LocalRequest::Bind { version, dc, ep } => self.bind(conn, version, dc, ep),
            LocalRequest::Unbind => {
                if self.bound(conn).is_none() {
                    return self.respond(conn, err(Errno::NotBound));
                }
                self.release_endpoint(conn, Errno::DstDied);
                self.reblock(conn, Blocked::Unbinding);
                self.actions
                    .push_back(Action::Directory(DirRequest::Sync { conn }));
            }
            LocalRequest::GetEp => match self.bound(conn) {
                Some((dc, ep)) => self.respond(
                    conn,
                    LocalResponse::Ep {
                        dc,
                        ep,
                        node: self.node,
                    },
                ),
                None => self.respond(conn, err(Errno::NotBound)),
            },
            LocalRequest::Send { dst, msg, timeout } => self.send(
                conn,
                dst,
                msg,
                DeliverKind::Send,
                timeout,
                now,
                LocalRequest::Send { dst, msg, timeout },
            ),
            LocalRequest::SendRec { dst, msg, timeout } => self.send(
                conn,
                dst,
                msg,
                DeliverKind::SendRec,
                timeout,
                now,
                LocalRequest::SendRec { dst, msg, timeout },
            ),
            LocalRequest::Receive { src, timeout } => self.receive(conn, src, timeout, now),
            LocalRequest::Reply { dst, msg } => self.reply(conn, dst, msg),
            LocalRequest::Notify { dst, value } => self.notify(conn, dst, value, now),
            LocalRequest::Vcopy {
                src,
                src_addr,
                dst,
                dst_addr,
                len,
                timeout,
            } => self.vcopy(
                conn,
                req_vcopy(src, src_addr, dst, dst_addr, len, timeout),
                now,
            ),
            LocalRequest::WaitForBind { ep, timeout } => self.wait_for_bind(conn, ep, timeout, now),
            LocalRequest::BindRestored { .. } | LocalRequest::Snapshot { .. } => {
                self.respond(conn, err(Errno::Invalid))
            }
        }
    }

    fn bound(&self, conn: ConnId) -> Option<(DcId, Ep)> {
        self.conns.get(&conn).and_then(|c| c.bound)
    }

    fn respond(&mut self, conn: ConnId, resp: LocalResponse) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = Blocked::No;
            c.deadline = None;
            c.gen += 1;
        }
        self.actions
            .push_back(Action::Local(LocalAction::Respond { conn, resp }));
    }

    /// Blocks `conn` in `state` until `timeout` (from `now`).
    fn block(
        &mut self,
        conn: ConnId,
        state: Blocked,
        timeout: Timeout,
        now: Instant,
        grace: Duration,
    ) {
        let deadline = timeout.as_duration().map(|d| now + d + grace);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.blocked = state;
        c.gen += 1;
        c.deadline = deadline;
        let gen = c.gen;
        if let Some(d) = deadline {
            self.add_timer(d, TimerKey::Conn { conn, gen });
        }
    }

    /// Re-blocks keeping the call's deadline (a call moving from one wait to the next).
    fn reblock(&mut self, conn: ConnId, state: Blocked) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.blocked = state;
        }
    }

    fn add_timer(&mut self, at: Instant, key: TimerKey) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq, key));
    }

    fn dc_check(&self, dc: DcId, ep: Ep) -> Result<&DcInfo, Errno> {
        let info = self.dcs.get(&dc).ok_or(Errno::NoSuchDc)?;
        if ep < 0 || ep as u32 >= info.max_endpoints {
            return Err(Errno::BadEndpoint);
        }
        Ok(info)
    }

    // ----- bind --------------------------------------------------------------------------

    fn bind(&mut self, conn: ConnId, version: u32, dc: DcId, ep: Ep) {
        if version != PROTOCOL_VERSION {
            return self.respond(conn, err(Errno::Invalid));
        }
        if self.bound(conn).is_some() {
            return self.respond(conn, err(Errno::ConnAlreadyBound));
        }
        let info = match self.dc_check(dc, ep) {
            Ok(i) => i,
            Err(e) => return self.respond(conn, err(e)),
        };
        if !info.nodes.contains(&self.node) {
            return self.respond(conn, err(Errno::NodeNotInDc));
        }
        if self.bind_refused(conn, dc, ep) {
            return self.respond(conn, err(Errno::Permission));
        }
        if let Some(Registration::Local { .. }) = self.table.get(dc, ep) {
            return self.respond(conn, err(Errno::AlreadyBound));
        }
        self.reblock(conn, Blocked::Binding);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.bound = Some((dc, ep));
        }
        self.actions
            .push_back(Action::Directory(DirRequest::Register { conn, dc, ep }));
    }

    /// The local connection of `{dc, ep}`: bound, or binding (its directory write is in flight;
    /// another node may already have seen it in the directory and sent it a message, which
    /// waits in its queue).
    fn local_or_binding(&self, dc: DcId, ep: Ep) -> Option<ConnId> {
        if let Some(Registration::Local { conn }) = self.table.get(dc, ep) {
            return Some(conn);
        }
        self.conns
            .iter()
            .find(|(_, c)| c.blocked == Blocked::Binding && c.bound == Some((dc, ep)))
            .map(|(id, _)| *id)
    }

    /// Whether `conn` may not bind `{dc, ep}` (logged with the reason): a process launched for
    /// an endpoint may bind only that one; any other needs a uid in the DC's `bind_uids`.
    fn bind_refused(&self, conn: ConnId, dc: DcId, ep: Ep) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return true;
        };
        let reason = match c.launched_for {
            Some(own) if own == (dc, ep) => return false,
            Some((ldc, lep)) => format!("it was launched for {ldc}/{lep}"),
            None if self
                .dcs
                .get(&dc)
                .is_some_and(|i| i.bind_uids.contains(&c.uid)) =>
            {
                return false
            }
            None => format!(
                "it was not launched by this node and uid {} is not in the DC's bind_uids",
                c.uid
            ),
        };
        tracing::warn!(
            conn,
            pid = c.pid,
            uid = c.uid,
            "bind of {dc}/{ep} refused (permission denied): {reason}"
        );
        true
    }

    /// Registers `{dc, ep}` here as running on `node` (the DVK's `rmtbind`), or as the backup
    /// of a replicated primary kept on `node` (`bkupbind`). Refused for an endpoint bound here.
    fn register_remote(
        &mut self,
        dc: DcId,
        ep: Ep,
        node: NodeId,
        backup: bool,
    ) -> Result<(), Errno> {
        let info = self.dc_check(dc, ep)?;
        if !info.nodes.contains(&node) || !info.nodes.contains(&self.node) {
            return Err(Errno::NodeNotInDc);
        }
        if node == self.node || matches!(self.table.get(dc, ep), Some(Registration::Local { .. })) {
            return Err(Errno::AlreadyBound);
        }
        let reg = if backup {
            Registration::Backup { node }
        } else {
            Registration::Remote { node }
        };
        self.table.set(dc, ep, reg);
        self.wake_bind_waiters(dc, ep);
        Ok(())
    }

    /// Every directory action up to [`DirRequest::Sync`] has landed.
    fn on_directory_synced(&mut self, conn: ConnId) {
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.blocked == Blocked::Unbinding)
        {
            self.respond(conn, LocalResponse::Done);
        }
    }

    /// The directory's answer to [`DirRequest::Register`]: `Err` names why (e.g. bound elsewhere).
    fn on_register_result(&mut self, conn: ConnId, result: Result<(), Errno>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.blocked != Blocked::Binding {
            return;
        }
        let (dc, ep) = c.bound.expect("binding connections carry their endpoint");
        let refused = match result {
            Err(e) => Some(e),
            // Two local connections raced for the same endpoint; the directory let the
            // second through because the key names this node.
            Ok(()) if matches!(self.table.get(dc, ep), Some(Registration::Local { .. })) => {
                Some(Errno::AlreadyBound)
            }
            Ok(()) => None,
        };
        if let Some(e) = refused {
            // Messages that arrived while the bind was in flight were for an endpoint that
            // did not come to be here.
            let c = self.conns.get_mut(&conn).expect("checked above");
            c.bound = None;
            let queued: Vec<Incoming> = c.queue.drain(..).collect();
            c.notifies.clear();
            for inc in queued {
                self.fail_incoming(dc, ep, inc, Errno::DstDied);
            }
            return self.respond(conn, err(e));
        }
        self.table.set(dc, ep, Registration::Local { conn });
        self.broadcast(dc, PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })));
        self.respond(
            conn,
            LocalResponse::Ep {
                dc,
                ep,
                node: self.node,
            },
        );
        self.wake_bind_waiters(dc, ep);
    }

    fn broadcast(&mut self, dc: DcId, frame: PeerFrame) {
        let Some(info) = self.dcs.get(&dc) else {
            return;
        };
        for n in info.nodes.iter().copied().filter(|n| *n != self.node) {
            if self.links_up.contains(&n) {
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: n,
                    frame: frame.clone(),
                }));
            }
        }
    }

    fn wake_bind_waiters(&mut self, dc: DcId, ep: Ep) {
        for w in self.bind_waiters.remove(&(dc, ep)).unwrap_or_default() {
            if matches!(self.conns.get(&w).map(|c| &c.blocked), Some(Blocked::WaitingBind { ep: e }) if *e == ep)
            {
                self.respond(w, LocalResponse::Done);
            }
        }
    }

    /// Unbinds `conn`'s endpoint: everyone waiting on it gets `why`.
    fn release_endpoint(&mut self, conn: ConnId, why: Errno) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some((dc, ep)) = c.bound.take() else {
            return;
        };
        let was_binding = c.blocked == Blocked::Binding;
        let queue = std::mem::take(&mut c.queue);
        let owed: Vec<(Ep, ReplyTo)> = c.owes_reply.drain().collect();
        c.notifies.clear();
        if was_binding {
            // The directory may still record it; remove it when the CAS lands.
            self.actions
                .push_back(Action::Directory(DirRequest::Unregister { dc, ep }));
            return;
        }
        if self.table.get(dc, ep) == Some(Registration::Local { conn }) {
            self.table.remove(dc, ep);
            self.actions
                .push_back(Action::Directory(DirRequest::Unregister { dc, ep }));
            self.broadcast(dc, PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep })));
        }
        self.remote_callers
            .retain(|(d, server, _), _| (*d, *server) != (dc, ep));
        for inc in queue {
            self.fail_incoming(dc, ep, inc, why);
        }
        for (client, to) in owed {
            match to {
                ReplyTo::Local(cc) => {
                    if matches!(self.conns.get(&cc).map(|c| &c.blocked), Some(Blocked::AwaitingReply { from }) if *from == ep)
                    {
                        self.respond(cc, err(why));
                    }
                }
                ReplyTo::Remote(node) => {
                    self.actions.push_back(Action::Peer(PeerAction::Send {
                        node,
                        frame: PeerFrame::Ipc(IpcFrame::Reply(Reply {
                            dc,
                            src: ep,
                            dst: client,
                            result: Err(why),
                        })),
                    }));
                }
            }
        }
        self.fail_local_receivers_from(dc, ep, Errno::SrcDied);
    }

    /// Local processes receiving only from `{dc, ep}` will never get a message: fail them.
    fn fail_local_receivers_from(&mut self, dc: DcId, ep: Ep, why: Errno) {
        let victims: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.bound.map(|b| b.0) == Some(dc)
                    && c.blocked
                        == Blocked::Receiving {
                            src: Source::Ep(ep),
                        }
            })
            .map(|(id, _)| *id)
            .collect();
        for v in victims {
            self.respond(v, err(why));
        }
    }

    fn fail_incoming(&mut self, dc: DcId, _dst: Ep, inc: Incoming, why: Errno) {
        match inc.origin {
            Origin::Local(sc) => self.respond(sc, err(why)),
            Origin::Remote { node, op } => {
                self.remote_incoming.remove(&(node, op));
                let _ = dc;
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                        op,
                        result: Err(why),
                    })),
                }));
            }
        }
    }

    /// Abandons whatever call `conn` is blocked in (it died or timed out): removes its queued
    /// message, cancels remote operations.
    fn abandon_call(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let dc = c.bound.map(|b| b.0);
        match c.blocked.clone() {
            Blocked::SendingLocal { dst, .. } => {
                if let (Some(dc), Some(Registration::Local { conn: q })) =
                    (dc, dc.and_then(|dc| self.table.get(dc, dst)))
                {
                    let _ = dc;
                    if let Some(qc) = self.conns.get_mut(&q) {
                        qc.queue.retain(|i| i.origin != Origin::Local(conn));
                    }
                }
            }
            Blocked::SendingRemote {
                node,
                op,
                dst,
                kind,
                ..
            } => {
                self.remote_sends.remove(&(node, op));
                if let (DeliverKind::SendRec, Some((dc, me))) = (kind, c.bound) {
                    self.abandoned.insert((node, op), (dc, me, dst));
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })),
                }));
            }
            Blocked::Vcopy { op } => {
                self.ops.remove(&op);
                self.forget_local_vcopy(op);
            }
            Blocked::Held { .. } => self.migr.unhold_call(conn),
            Blocked::LookingUp { ep, .. } | Blocked::WaitingBind { ep } => {
                if let Some(dc) = dc {
                    if let Some(v) = self.lookups.get_mut(&(dc, ep)) {
                        v.retain(|x| *x != conn);
                    }
                    if let Some(v) = self.bind_waiters.get_mut(&(dc, ep)) {
                        v.retain(|x| *x != conn);
                    }
                }
            }
            _ => {}
        }
    }

    // ----- resolution --------------------------------------------------------------------

    /// Where `{dc, ep}` runs, or parks `conn` on a directory lookup and returns `None`.
    fn resolve(
        &mut self,
        conn: ConnId,
        dc: DcId,
        ep: Ep,
        req: &LocalRequest,
    ) -> Option<Registration> {
        // Calls naming a migrating endpoint wait for the outcome, except the endpoint's own
        // (a server copying from itself while it finishes serving before it can quiesce).
        if self.migr.holds(dc, ep) && self.bound(conn) != Some((dc, ep)) {
            self.migr.hold_call(dc, ep, conn);
            self.reblock(conn, Blocked::Held { req: req.clone() });
            return None;
        }
        if let Some(r) = self.table.get(dc, ep) {
            return Some(r);
        }
        let waiters = self.lookups.entry((dc, ep)).or_default();
        if waiters.is_empty() {
            self.actions
                .push_back(Action::Directory(DirRequest::Lookup { dc, ep }));
        }
        waiters.push(conn);
        self.reblock(
            conn,
            Blocked::LookingUp {
                ep,
                req: req.clone(),
            },
        );
        None
    }

    /// The directory's answer to [`DirRequest::Lookup`]: the node running `{dc, ep}`, if any.
    fn on_lookup_result(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>, now: Instant) {
        if let Some(n) = node {
            if n != self.node && self.table.get(dc, ep).is_none() {
                self.table.set(dc, ep, Registration::Remote { node: n });
            }
        }
        let known = self.table.get(dc, ep).is_some();
        if known {
            self.wake_bind_waiters(dc, ep);
        }
        for w in self.lookups.remove(&(dc, ep)).unwrap_or_default() {
            let Some(c) = self.conns.get_mut(&w) else {
                continue;
            };
            let Blocked::LookingUp { ep: e, req } = c.blocked.clone() else {
                continue;
            };
            if e != ep {
                continue;
            }
            c.blocked = Blocked::No;
            if known {
                self.run_request(w, req, now);
            } else if self.table.registered_elsewhere(dc, ep) {
                self.respond(w, err(Errno::OtherDc));
            } else {
                self.respond(w, err(Errno::NoSuchEndpoint));
            }
        }
    }

    /// The directory says `{dc, ep}` now runs on `node` (`None`: nowhere).
    fn on_directory_update(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>) {
        match (node, self.table.get(dc, ep)) {
            (_, Some(Registration::Local { .. })) => {}
            (Some(n), _) if n != self.node => {
                self.table.set(dc, ep, Registration::Remote { node: n });
                self.wake_bind_waiters(dc, ep);
            }
            (None, Some(Registration::Remote { .. } | Registration::Backup { .. })) => {
                self.table.remove(dc, ep);
            }
            _ => {}
        }
    }

    // ----- send / sendrec ----------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        conn: ConnId,
        dst: Ep,
        mut msg: Message,
        kind: DeliverKind,
        timeout: Timeout,
        now: Instant,
        req: LocalRequest,
    ) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, dst) {
            return self.respond(conn, err(e));
        }
        if dst == me {
            return self.respond(conn, err(Errno::SelfSend));
        }
        msg.source = me;
        let Some(reg) = self.resolve(conn, dc, dst, &req) else {
            return;
        };
        match reg {
            Registration::Local { conn: q } => {
                let inc = Incoming {
                    src: me,
                    msg,
                    kind,
                    origin: Origin::Local(conn),
                };
                if self.try_hand_over(q, dc, dst, &inc) {
                    self.after_taken(dc, dst, q, inc);
                    if kind == DeliverKind::SendRec {
                        // Taken at once: the call's timeout still bounds the wait for the reply
                        // (after_taken only re-blocks, which keeps a deadline this call never set).
                        self.block(
                            conn,
                            Blocked::AwaitingReply { from: dst },
                            timeout,
                            now,
                            Duration::ZERO,
                        );
                    }
                    return;
                }
                // Deadlock: the destination is itself blocked sending to us.
                if let Some(qc) = self.conns.get(&q) {
                    if matches!(qc.blocked, Blocked::SendingLocal { dst: d, .. } if d == me) {
                        return self.respond(conn, err(Errno::Deadlock));
                    }
                }
                if timeout == Timeout::NoWait {
                    return self.respond(conn, err(Errno::TimedOut));
                }
                if let Err(e) = self.enqueue(dc, q, inc) {
                    return self.respond(conn, err(e));
                }
                self.block(
                    conn,
                    Blocked::SendingLocal {
                        dst,
                        kind,
                        msg,
                        timeout,
                    },
                    timeout,
                    now,
                    Duration::ZERO,
                );
            }
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                let op = self.new_op();
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                        op,
                        dc,
                        src: me,
                        dst,
                        kind,
                        msg,
                        timeout,
                    })),
                }));
                self.remote_sends.insert((node, op), conn);
                self.block(
                    conn,
                    Blocked::SendingRemote {
                        dst,
                        node,
                        op,
                        kind,
                        msg,
                        timeout,
                    },
                    timeout,
                    now,
                    REMOTE_GRACE,
                );
            }
        }
    }

    fn new_op(&mut self) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    /// Queues `inc` for local endpoint `q` of `dc`, within the DC's queue limit.
    fn enqueue(&mut self, dc: DcId, q: ConnId, inc: Incoming) -> Result<(), Errno> {
        let max = self
            .dcs
            .get(&dc)
            .map(|d| d.max_queue as usize)
            .unwrap_or(usize::MAX);
        let qc = self
            .conns
            .get_mut(&q)
            .expect("local registrations point at live conns");
        if qc.queue.len() >= max {
            return Err(Errno::QueueFull);
        }
        qc.queue.push_back(inc);
        Ok(())
    }

    /// If local endpoint `q` is receiving and accepts `inc`, hands the message over.
    fn try_hand_over(&mut self, q: ConnId, _dc: DcId, _dst: Ep, inc: &Incoming) -> bool {
        let Some(qc) = self.conns.get(&q) else {
            return false;
        };
        match qc.blocked {
            Blocked::Receiving { src } if src.accepts(inc.src) => {
                self.respond(q, LocalResponse::Msg(inc.msg));
                true
            }
            _ => false,
        }
    }

    /// `inc` was taken by local endpoint `{dc, dst}` (connection `q`): complete its sender.
    fn after_taken(&mut self, dc: DcId, dst: Ep, q: ConnId, inc: Incoming) {
        match (inc.kind, inc.origin) {
            (DeliverKind::Send, Origin::Local(s)) => self.respond(s, LocalResponse::Done),
            (DeliverKind::Send, Origin::Remote { node, op }) => {
                self.remote_incoming.remove(&(node, op));
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Ok(()) })),
                }));
            }
            (DeliverKind::SendRec, origin) => {
                let to = match origin {
                    Origin::Local(s) => {
                        self.reblock(s, Blocked::AwaitingReply { from: dst });
                        ReplyTo::Local(s)
                    }
                    Origin::Remote { node, op } => {
                        self.remote_incoming.remove(&(node, op));
                        self.remote_callers.insert((dc, dst, inc.src), (node, op));
                        ReplyTo::Remote(node)
                    }
                };
                if let Some(qc) = self.conns.get_mut(&q) {
                    qc.owes_reply.insert(inc.src, to);
                }
            }
        }
        let _ = dc;
    }

    // ----- receive -----------------------------------------------------------------------

    fn receive(&mut self, conn: ConnId, src: Source, timeout: Timeout, now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        let c = self.conns.get_mut(&conn).expect("caller exists");
        // A migrating endpoint takes nothing new: what waits for it travels or is replayed.
        if c.migrating_out.is_some() {
            self.block(
                conn,
                Blocked::Receiving { src },
                timeout,
                now,
                Duration::ZERO,
            );
            return;
        }
        // Pending notifications first.
        let pending = match src {
            Source::Any => c.notifies.keys().next().copied(),
            Source::Ep(e) => c.notifies.contains_key(&e).then_some(e),
        };
        if let Some(from) = pending {
            let value = c.notifies.remove(&from).expect("present");
            return self.respond(conn, LocalResponse::Msg(notify_message(from, value)));
        }
        if let Some(pos) = c.queue.iter().position(|i| src.accepts(i.src)) {
            let inc = c.queue.remove(pos).expect("position is valid");
            self.respond(conn, LocalResponse::Msg(inc.msg));
            self.after_taken(dc, me, conn, inc);
            return;
        }
        if timeout == Timeout::NoWait {
            return self.respond(conn, err(Errno::TimedOut));
        }
        self.block(
            conn,
            Blocked::Receiving { src },
            timeout,
            now,
            Duration::ZERO,
        );
    }

    // ----- reply -------------------------------------------------------------------------

    fn reply(&mut self, conn: ConnId, dst: Ep, mut msg: Message) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        msg.source = me;
        let c = self.conns.get_mut(&conn).expect("caller exists");
        let Some(to) = c.owes_reply.remove(&dst) else {
            return self.respond(conn, err(Errno::NotWaiting));
        };
        self.remote_callers.remove(&(dc, me, dst));
        let frame = PeerFrame::Ipc(IpcFrame::Reply(Reply {
            dc,
            src: me,
            dst,
            result: Ok(msg),
        }));
        // The client may be migrating: the reply waits for the outcome and follows it.
        if self.migr.holds(dc, dst) {
            self.migr.hold_frame(dc, dst, frame);
            return self.respond(conn, LocalResponse::Done);
        }
        // Route by where the client is now (it may have migrated since it called).
        let target = match (self.table.get(dc, dst), to) {
            (Some(Registration::Local { conn: cc }), _) | (None, ReplyTo::Local(cc)) => {
                ReplyTo::Local(cc)
            }
            (Some(Registration::Remote { node } | Registration::Backup { node }), _)
            | (None, ReplyTo::Remote(node)) => ReplyTo::Remote(node),
        };
        match target {
            ReplyTo::Local(cc) => {
                if !matches!(self.conns.get(&cc).map(|c| &c.blocked), Some(Blocked::AwaitingReply { from }) if *from == me)
                {
                    return self.respond(conn, err(Errno::NotWaiting));
                }
                self.respond(cc, LocalResponse::Msg(msg));
            }
            ReplyTo::Remote(node) => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions
                    .push_back(Action::Peer(PeerAction::Send { node, frame }));
            }
        }
        self.respond(conn, LocalResponse::Done);
    }

    // ----- notify ------------------------------------------------------------------------

    fn notify(&mut self, conn: ConnId, dst: Ep, value: u64, _now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, dst) {
            return self.respond(conn, err(e));
        }
        if dst == me {
            return self.respond(conn, err(Errno::SelfSend));
        }
        // Never blocks: a notify to a migrating endpoint is stored and delivered after the move.
        if self.migr.holds(dc, dst) {
            self.migr.hold_frame(
                dc,
                dst,
                PeerFrame::Ipc(IpcFrame::Notify(Notify {
                    dc,
                    src: me,
                    dst,
                    value,
                })),
            );
            return self.respond(conn, LocalResponse::Done);
        }
        let Some(reg) = self.resolve(conn, dc, dst, &LocalRequest::Notify { dst, value }) else {
            return;
        };
        match reg {
            Registration::Local { conn: q } => self.notify_local(q, me, value),
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::Notify(Notify {
                        dc,
                        src: me,
                        dst,
                        value,
                    })),
                }));
            }
        }
        self.respond(conn, LocalResponse::Done);
    }

    fn notify_local(&mut self, q: ConnId, src: Ep, value: u64) {
        let Some(qc) = self.conns.get_mut(&q) else {
            return;
        };
        match qc.blocked {
            Blocked::Receiving { src: s } if s.accepts(src) && !qc.notifies.contains_key(&src) => {
                self.respond(q, LocalResponse::Msg(notify_message(src, value)));
            }
            _ => *qc.notifies.entry(src).or_insert(0) |= value,
        }
    }

    // ----- wait_for_bind -----------------------------------------------------------------

    fn wait_for_bind(&mut self, conn: ConnId, ep: Ep, timeout: Timeout, now: Instant) {
        let Some((dc, _)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if let Err(e) = self.dc_check(dc, ep) {
            return self.respond(conn, err(e));
        }
        if self.table.get(dc, ep).is_some() {
            return self.respond(conn, LocalResponse::Done);
        }
        if timeout == Timeout::NoWait {
            return self.respond(conn, err(Errno::TimedOut));
        }
        // Ask the directory once in case a registration was missed; a watch or a peer's
        // `Bound` wakes us otherwise.
        if let std::collections::hash_map::Entry::Vacant(e) = self.lookups.entry((dc, ep)) {
            e.insert(Vec::new());
            self.actions
                .push_back(Action::Directory(DirRequest::Lookup { dc, ep }));
        }
        self.bind_waiters.entry((dc, ep)).or_default().push(conn);
        self.block(
            conn,
            Blocked::WaitingBind { ep },
            timeout,
            now,
            Duration::ZERO,
        );
    }

    // ----- vcopy -------------------------------------------------------------------------

    fn vcopy(&mut self, conn: ConnId, v: VcopyArgs, now: Instant) {
        let Some((dc, me)) = self.bound(conn) else {
            return self.respond(conn, err(Errno::NotBound));
        };
        if v.len > VCOPY_MAX {
            return self.respond(conn, err(Errno::TooBig));
        }
        for ep in [v.src, v.dst] {
            if let Err(e) = self.dc_check(dc, ep) {
                return self.respond(conn, err(e));
            }
        }
        let req = v.request();
        let Some(src_reg) = self.resolve(conn, dc, v.src, &req) else {
            return;
        };
        let Some(dst_reg) = self.resolve(conn, dc, v.dst, &req) else {
            return;
        };
        if v.len == 0 {
            return self.respond(conn, LocalResponse::Done);
        }
        let op = self.new_op();
        match src_reg {
            Registration::Local { conn: sc } => {
                let src_pid = match self.party_pid(sc, conn) {
                    Ok(p) => p,
                    Err(e) => return self.respond(conn, err(e)),
                };
                match dst_reg {
                    Registration::Local { conn: dcn } => {
                        let dst_pid = match self.party_pid(dcn, conn) {
                            Ok(p) => p,
                            Err(e) => return self.respond(conn, err(e)),
                        };
                        self.actions
                            .push_back(Action::Memory(MemoryAction::CopyLocal {
                                src_pid,
                                src_addr: v.src_addr,
                                dst_pid,
                                dst_addr: v.dst_addr,
                                len: v.len,
                                done: VcopyCompletion::Local { op },
                            }));
                    }
                    Registration::Remote { node } | Registration::Backup { node } => {
                        if !self.links_up.contains(&node) {
                            return self.respond(conn, err(Errno::NodeUnreachable));
                        }
                        self.actions.push_back(Action::Memory(MemoryAction::Stream {
                            pid: src_pid,
                            src_addr: v.src_addr,
                            len: v.len,
                            to: node,
                            op,
                            caller_node: self.node,
                            dc,
                            caller: me,
                            dst: v.dst,
                            dst_addr: v.dst_addr,
                        }));
                    }
                }
            }
            Registration::Remote { node } | Registration::Backup { node } => {
                if !self.links_up.contains(&node) {
                    return self.respond(conn, err(Errno::NodeUnreachable));
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                        op,
                        caller_node: self.node,
                        dc,
                        caller: me,
                        src: v.src,
                        src_addr: v.src_addr,
                        dst: v.dst,
                        dst_addr: v.dst_addr,
                        len: v.len,
                    })),
                }));
                // The source node streams the data here when the destination is local.
                if let Registration::Local { .. } = dst_reg {
                    self.expect_vcopy_data(node, op, dc, me, v.dst, v.dst_addr, v.len);
                }
            }
        }
        let remote = |r: Registration| Some(r.node(self.node)).filter(|n| *n != self.node);
        let nodes = [remote(src_reg), remote(dst_reg)];
        self.ops.insert(op, Op::Vcopy { conn, nodes });
        self.block(conn, Blocked::Vcopy { op }, v.timeout, now, Duration::ZERO);
    }

    /// The pid of a vcopy party: it must be the caller or blocked in IPC.
    fn party_pid(&self, party: ConnId, caller_conn: ConnId) -> Result<i32, Errno> {
        let c = self.conns.get(&party).ok_or(Errno::DstDied)?;
        if party != caller_conn && !is_blocked_in_ipc(&c.blocked) {
            return Err(Errno::Busy);
        }
        Ok(c.pid)
    }

    /// A local vcopy finished.
    fn on_vcopy_local_done(&mut self, done: VcopyCompletion, result: Result<(), Errno>) {
        self.complete_vcopy(done, result);
    }

    fn complete_vcopy(&mut self, done: VcopyCompletion, result: Result<(), Errno>) {
        match done {
            VcopyCompletion::Local { op } => {
                if let Some(Op::Vcopy { conn, .. }) = self.ops.remove(&op) {
                    self.forget_local_vcopy(op);
                    let resp = match result {
                        Ok(()) => LocalResponse::Done,
                        Err(e) => err(e),
                    };
                    self.respond(conn, resp);
                }
            }
            VcopyCompletion::Remote { node, op } => {
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node,
                    frame: PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result })),
                }));
            }
        }
    }

    fn completion(&self, caller_node: NodeId, op: OpId) -> VcopyCompletion {
        if caller_node == self.node {
            VcopyCompletion::Local { op }
        } else {
            VcopyCompletion::Remote {
                node: caller_node,
                op,
            }
        }
    }

    /// Reading the source of a vcopy stream failed; tell the caller.
    fn on_vcopy_stream_failed(&mut self, caller_node: NodeId, op: OpId, e: Errno) {
        let done = self.completion(caller_node, op);
        self.complete_vcopy(done, Err(e));
    }

    // ----- peers -------------------------------------------------------------------------

    /// The link to `node` came up.
    fn on_link_up(&mut self, node: NodeId) {
        self.links_up.insert(node);
        self.condemned.remove(&node);
        // Tell the peer what runs here, in case it missed it while the link was down.
        let mine: Vec<(DcId, Ep)> = self
            .table
            .entries()
            .into_iter()
            .filter(|(dc, _, r)| {
                matches!(r, Registration::Local { .. })
                    && self.dcs.get(dc).is_some_and(|d| d.nodes.contains(&node))
            })
            .map(|(dc, ep, _)| (dc, ep))
            .collect();
        for (dc, ep) in mine {
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node,
                frame: PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })),
            }));
        }
    }

    /// The link to `node` went down: every call depending on it fails.
    fn on_link_down(&mut self, node: NodeId) {
        self.condemned.remove(&node);
        self.forget_incoming_vcopies(node);
        if !self.links_up.remove(&node) {
            return;
        }
        self.migration_link_down(node);
        let victims: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.blocked {
                Blocked::SendingRemote { node: n, .. } => n == node,
                Blocked::AwaitingReply { from } => c
                    .bound
                    .is_some_and(|(dc, _)| matches!(self.table.get(dc, from), Some(Registration::Remote { node: n } | Registration::Backup { node: n }) if n == node)),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for v in victims {
            self.respond(v, err(Errno::NodeUnreachable));
        }
        // Receivers waiting for an endpoint of that node only would wait in vain.
        let receivers: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match (c.blocked.clone(), c.bound) {
                (Blocked::Receiving { src: Source::Ep(x) }, Some((dc, _))) if c.migrating_out.is_none() => {
                    matches!(self.table.get(dc, x), Some(Registration::Remote { node: n } | Registration::Backup { node: n }) if n == node)
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for v in receivers {
            self.respond(v, err(Errno::NodeUnreachable));
        }
        self.remote_sends.retain(|(n, _), _| *n != node);
        self.abandoned.retain(|(n, _), _| *n != node);
        self.remote_callers.retain(|_, (n, _)| *n != node);
        // Messages queued here by processes of that node: their senders are unreachable.
        let from_there: Vec<(NodeId, OpId)> = self
            .remote_incoming
            .keys()
            .filter(|(n, _)| *n == node)
            .copied()
            .collect();
        for key in from_there {
            if let Some((dc, dst)) = self.remote_incoming.remove(&key) {
                self.drop_remote_incoming(dc, dst, key);
            }
        }
        for c in self.conns.values_mut() {
            c.owes_reply.retain(|_, to| *to != ReplyTo::Remote(node));
        }
        // A vcopy of a local caller whose source or destination runs there would hang (its
        // data or its verdict crosses that link): fail it. Vcopies not involving that node
        // (local ones, or between other nodes) go on.
        let vcopies: Vec<ConnId> = self
            .ops
            .values()
            .filter(|Op::Vcopy { nodes, .. }| nodes.contains(&Some(node)))
            .map(|Op::Vcopy { conn, .. }| *conn)
            .collect();
        for conn in vcopies {
            if let Some(Blocked::Vcopy { op }) = self.conns.get(&conn).map(|c| c.blocked.clone()) {
                self.ops.remove(&op);
                self.forget_local_vcopy(op);
                self.respond(conn, err(Errno::NodeUnreachable));
            }
        }
    }

    fn drop_remote_incoming(&mut self, dc: DcId, dst: Ep, (node, op): (NodeId, OpId)) -> bool {
        if let Some(Registration::Local { conn }) = self.table.get(dc, dst) {
            if let Some(c) = self.conns.get_mut(&conn) {
                let before = c.queue.len();
                c.queue.retain(|i| i.origin != Origin::Remote { node, op });
                return c.queue.len() != before;
            }
        }
        false
    }

    /// A frame from the peer `from` (after the handshake).
    /// Frames that fail the checks of [`peer_check`] have no effect.
    fn on_peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        if self.is_condemned(from) {
            return;
        }
        match self.check_peer_frame(from, &frame) {
            Verdict::Accept => {
                self.peer_frame(from, frame, now);
                self.check_quiescence(now);
            }
            Verdict::Ignore(why) => {
                tracing::debug!(node = from, frame = frame.kind(), "dropped: {why}");
            }
            Verdict::Refuse(v) => self.peer_violation(from, frame.kind(), v),
            Verdict::AlreadyApplied(id) => self.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Migr(MigrFrame::Done(MigrDone { id, held: 0 })),
            })),
        }
    }

    fn peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        match frame {
            PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                op,
                dc,
                src,
                dst,
                kind,
                msg,
                timeout,
            })) => self.remote_deliver(from, op, dc, src, dst, kind, msg, timeout, now),
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result })) => {
                self.remote_delivered(from, op, result)
            }
            PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })) => {
                if let Some((dc, dst)) = self.remote_incoming.remove(&(from, op)) {
                    self.drop_remote_incoming(dc, dst, (from, op));
                }
                self.migr.unhold_deliver(from, op);
                // A caller that gave up after its sendrec was taken is not owed a reply any
                // more (as a local caller that timed out); acknowledge, so that any reply to
                // `op` is on the link ahead of the ack (see `abandoned`).
                let gave_up: Vec<(DcId, Ep, Ep)> = self
                    .remote_callers
                    .iter()
                    .filter(|(_, v)| **v == (from, op))
                    .map(|(k, _)| *k)
                    .collect();
                for (dc, server, client) in gave_up {
                    self.remote_callers.remove(&(dc, server, client));
                    if let Some(Registration::Local { conn }) = self.table.get(dc, server) {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            if c.owes_reply.get(&client) == Some(&ReplyTo::Remote(from)) {
                                c.owes_reply.remove(&client);
                            }
                        }
                    }
                }
                self.actions.push_back(Action::Peer(PeerAction::Send {
                    node: from,
                    frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                        op,
                        result: Err(Errno::TimedOut),
                    })),
                }));
            }
            PeerFrame::Ipc(IpcFrame::Reply(Reply {
                dc,
                src,
                dst,
                result,
            })) => {
                if self
                    .abandoned
                    .iter()
                    .any(|((n, _), pair)| *n == from && *pair == (dc, dst, src))
                {
                    return;
                }
                if self.migr.holds(dc, dst) {
                    return self.migr.hold_frame(
                        dc,
                        dst,
                        PeerFrame::Ipc(IpcFrame::Reply(Reply {
                            dc,
                            src,
                            dst,
                            result,
                        })),
                    );
                }
                let Some(Registration::Local { conn }) = self.table.get(dc, dst) else {
                    return;
                };
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                let waiting = match c.blocked {
                    Blocked::SendingRemote {
                        dst: d,
                        kind: DeliverKind::SendRec,
                        node,
                        op,
                        ..
                    } if d == src => {
                        self.remote_sends.remove(&(node, op));
                        true
                    }
                    Blocked::AwaitingReply { from } => from == src,
                    _ => false,
                };
                if waiting {
                    self.respond(conn, reply_response(src, result));
                }
            }
            PeerFrame::Ipc(IpcFrame::Notify(Notify {
                dc,
                src,
                dst,
                value,
            })) => {
                if !self.peer_in_dc(from, dc) {
                    return;
                }
                self.absorb_remote(dc, src, from);
                if self.migr.holds(dc, dst) {
                    return self.migr.hold_frame(
                        dc,
                        dst,
                        PeerFrame::Ipc(IpcFrame::Notify(Notify {
                            dc,
                            src,
                            dst,
                            value,
                        })),
                    );
                }
                if let Some(conn) = self.local_or_binding(dc, dst) {
                    self.notify_local(conn, src, value);
                }
            }
            PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                op,
                caller_node,
                dc,
                caller,
                src,
                src_addr,
                dst,
                dst_addr,
                len,
            })) => self.remote_vcopy_pull(
                from,
                op,
                caller_node,
                dc,
                caller,
                src,
                src_addr,
                dst,
                dst_addr,
                len,
            ),
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result })) => {
                self.complete_vcopy(VcopyCompletion::Local { op }, result)
            }
            PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep })) => {
                if self.peer_in_dc(from, dc)
                    && !matches!(self.table.get(dc, ep), Some(Registration::Local { .. }))
                {
                    self.table.set(dc, ep, Registration::Remote { node: from });
                    self.wake_bind_waiters(dc, ep);
                }
            }
            PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep })) => {
                if matches!(self.table.get(dc, ep), Some(Registration::Remote { node } | Registration::Backup { node }) if node == from)
                {
                    self.table.remove(dc, ep);
                    self.fail_local_receivers_from(dc, ep, Errno::SrcDied);
                }
            }
            // Handshake and liveness frames are the daemon's business.
            PeerFrame::Link(_) => {}
            PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { .. })) => {}
            f @ (PeerFrame::Ipc(IpcFrame::Redirect(Redirect { .. }))
            | PeerFrame::Migr(MigrFrame::Start(MigrStart { .. }))
            | PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { .. }))
            | PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare { .. }))
            | PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk { .. }))
            | PeerFrame::Migr(MigrFrame::Restore(MigrRestore { .. }))
            | PeerFrame::Migr(MigrFrame::Restored(MigrRestored { .. }))
            | PeerFrame::Migr(MigrFrame::Commit(MigrCommit { .. }))
            | PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { .. }))
            | PeerFrame::Migr(MigrFrame::Done(MigrDone { .. }))) => {
                self.on_migration_frame(from, f, now)
            }
        }
    }

    fn peer_in_dc(&self, peer: NodeId, dc: DcId) -> bool {
        self.dcs
            .get(&dc)
            .is_some_and(|d| d.nodes.contains(&peer) && d.nodes.contains(&self.node))
    }

    /// A message from an endpoint we did not know registers it as REMOTE at its node
    /// (docs/ARCHITECTURE.md §7.1), so that a migrated client is absorbed without commands.
    fn absorb_remote(&mut self, dc: DcId, src: Ep, node: NodeId) {
        match self.table.get(dc, src) {
            Some(Registration::Local { .. }) => {}
            Some(Registration::Remote { node: n } | Registration::Backup { node: n })
                if n == node => {}
            _ => {
                self.table.set(dc, src, Registration::Remote { node });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remote_deliver(
        &mut self,
        from: NodeId,
        op: OpId,
        dc: DcId,
        src: Ep,
        dst: Ep,
        kind: DeliverKind,
        mut msg: Message,
        timeout: Timeout,
        now: Instant,
    ) {
        let fail = |core: &mut Self, e: Errno| {
            core.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Err(e) })),
            }));
        };
        if !self.peer_in_dc(from, dc) {
            return fail(self, Errno::NodeNotInDc);
        }
        if let Err(e) = self.dc_check(dc, dst).and_then(|_| self.dc_check(dc, src)) {
            return fail(self, e);
        }
        self.absorb_remote(dc, src, from);
        if self.migr.holds(dc, dst) {
            // On the destination, the sender's node may have applied a COMMIT that has not
            // reached this node yet, and would not hold a redirected call any more: the
            // message waits here for the outcome instead.
            if self.migr.is_destination(dc, dst, self.node) {
                let frame = PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                    op,
                    dc,
                    src,
                    dst,
                    kind,
                    msg,
                    timeout,
                }));
                return self.migr.hold_deliver(dc, dst, from, frame);
            }
            // Not taken: the sender's node holds the call and sends it again after the outcome.
            self.actions.push_back(Action::Peer(PeerAction::Send {
                node: from,
                frame: PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst })),
            }));
            return;
        }
        let Some(q) = self.local_or_binding(dc, dst) else {
            return fail(self, Errno::DstDied);
        };
        msg.source = src;
        let inc = Incoming {
            src,
            msg,
            kind,
            origin: Origin::Remote { node: from, op },
        };
        if self.try_hand_over(q, dc, dst, &inc) {
            self.after_taken(dc, dst, q, inc);
            return;
        }
        if timeout == Timeout::NoWait {
            return fail(self, Errno::TimedOut);
        }
        if let Err(e) = self.enqueue(dc, q, inc) {
            return fail(self, e);
        }
        self.remote_incoming.insert((from, op), (dc, dst));
        if let Some(d) = timeout.as_duration() {
            self.add_timer(now + d, TimerKey::Incoming { node: from, op });
        }
    }

    fn remote_delivered(&mut self, from: NodeId, op: OpId, result: Result<(), Errno>) {
        self.abandoned.remove(&(from, op));
        let Some(conn) = self.remote_sends.remove(&(from, op)) else {
            return;
        };
        let still = self.conns.get(&conn).is_some_and(|c| matches!(c.blocked, Blocked::SendingRemote { node, op: o, .. } if node == from && o == op));
        if !still {
            return;
        }
        match result {
            Ok(()) => self.respond(conn, LocalResponse::Done),
            Err(e) => self.respond(conn, err(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remote_vcopy_pull(
        &mut self,
        from: NodeId,
        op: OpId,
        caller_node: NodeId,
        dc: DcId,
        caller: Ep,
        src: Ep,
        src_addr: u64,
        dst: Ep,
        dst_addr: u64,
        len: u64,
    ) {
        let done = self.completion(caller_node, op);
        let result: Result<(), Errno> = (|| {
            if !self.peer_in_dc(from, dc) {
                return Err(Errno::NodeNotInDc);
            }
            if let Err(v) = self.caller_on(from, dc, caller) {
                tracing::warn!(node = from, op, "vcopy pull refused: {v}");
                return Err(Errno::Permission);
            }
            if len > VCOPY_MAX {
                return Err(Errno::TooBig);
            }
            let src_pid = match self.table.get(dc, src) {
                Some(Registration::Local { conn: sc }) => {
                    let s = self.conns.get(&sc).ok_or(Errno::SrcDied)?;
                    if !is_blocked_in_ipc(&s.blocked) {
                        return Err(Errno::Busy);
                    }
                    s.pid
                }
                _ => self.installing_pid(dc, src).ok_or(Errno::SrcDied)?,
            };
            match self.table.get(dc, dst) {
                Some(Registration::Local { conn: dcn }) => {
                    let d = self.conns.get(&dcn).ok_or(Errno::DstDied)?;
                    if !is_blocked_in_ipc(&d.blocked) {
                        return Err(Errno::Busy);
                    }
                    self.actions
                        .push_back(Action::Memory(MemoryAction::CopyLocal {
                            src_pid,
                            src_addr,
                            dst_pid: d.pid,
                            dst_addr,
                            len,
                            done,
                        }));
                }
                Some(Registration::Remote { node } | Registration::Backup { node }) => {
                    if !self.links_up.contains(&node) {
                        return Err(Errno::NodeUnreachable);
                    }
                    self.actions.push_back(Action::Memory(MemoryAction::Stream {
                        pid: src_pid,
                        src_addr,
                        len,
                        to: node,
                        op,
                        caller_node,
                        dc,
                        caller,
                        dst,
                        dst_addr,
                    }));
                }
                None => {
                    // The caller knows the destination; trust its node if it is the caller's.
                    if caller == dst && self.links_up.contains(&caller_node) {
                        self.actions.push_back(Action::Memory(MemoryAction::Stream {
                            pid: src_pid,
                            src_addr,
                            len,
                            to: caller_node,
                            op,
                            caller_node,
                            dc,
                            caller,
                            dst,
                            dst_addr,
                        }));
                    } else {
                        return Err(Errno::NoSuchEndpoint);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.complete_vcopy(done, Err(e));
        }
    }

    // ----- timers ------------------------------------------------------------------------

    /// Fires every timer due at `now`.
    fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, seq, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, seq, key));
            match key {
                TimerKey::Conn { conn, gen } => {
                    // A migrating endpoint's deadline travels with it; its node applies it.
                    let live = self.conns.get(&conn).is_some_and(|c| {
                        c.gen == gen
                            && c.blocked != Blocked::No
                            && c.migrating_out.is_none()
                            && !matches!(
                                c.blocked,
                                Blocked::Installing { .. } | Blocked::Snapshotting
                            )
                    });
                    if live {
                        self.abandon_call(conn);
                        self.respond(conn, err(Errno::TimedOut));
                    }
                }
                TimerKey::Incoming { node, op } => {
                    if let Some((dc, dst)) = self.remote_incoming.remove(&(node, op)) {
                        if self.drop_remote_incoming(dc, dst, (node, op)) {
                            self.actions.push_back(Action::Peer(PeerAction::Send {
                                node,
                                frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                                    op,
                                    result: Err(Errno::TimedOut),
                                })),
                            }));
                        }
                    }
                }
                TimerKey::Migration { id } => self.on_migration_timer(id, now),
            }
        }
    }
}

fn is_blocked_in_ipc(b: &Blocked) -> bool {
    matches!(
        b,
        Blocked::SendingLocal { .. }
            | Blocked::SendingRemote { .. }
            | Blocked::AwaitingReply { .. }
            | Blocked::Receiving { .. }
            | Blocked::Held { .. }
    )
}

/// What a client waiting in sendrec gets for a reply (or its failure) from `src`.
fn reply_response(src: Ep, result: Result<Message, Errno>) -> LocalResponse {
    match result {
        Ok(mut m) => {
            m.source = src;
            LocalResponse::Msg(m)
        }
        Err(e) => err(e),
    }
}

fn notify_message(from: Ep, value: u64) -> Message {
    let mut m = Message::new(NOTIFY_MTYPE);
    m.source = from;
    m.set_word(0, value);
    m
}

struct VcopyArgs {
    src: Ep,
    src_addr: u64,
    dst: Ep,
    dst_addr: u64,
    len: u64,
    timeout: Timeout,
}

impl VcopyArgs {
    fn request(&self) -> LocalRequest {
        LocalRequest::Vcopy {
            src: self.src,
            src_addr: self.src_addr,
            dst: self.dst,
            dst_addr: self.dst_addr,
            len: self.len,
            timeout: self.timeout,
        }
    }
}

fn req_vcopy(
    src: Ep,
    src_addr: u64,
    dst: Ep,
    dst_addr: u64,
    len: u64,
    timeout: Timeout,
) -> VcopyArgs {
    VcopyArgs {
        src,
        src_addr,
        dst,
        dst_addr,
        len,
        timeout,
    }
}
