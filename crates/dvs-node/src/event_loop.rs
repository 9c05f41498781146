//! The event loop: the one task that owns the core and every I/O handle of the node.
//!
//! I/O tasks (local connection readers, peer link dialers and readers, the control socket,
//! the directory thread, the TLS reloader) and finished blocking jobs (criu, image files,
//! `/proc` walks) never touch the node's state: they send an [`Event`] over one channel.
//! [`Node::run`] takes events, gives the core its inputs and carries out every action the core
//! polls (in [`Node::execute_actions`], the only place actions are executed), then writes
//! what the round queued and re-arms the timer from `poll_timeout`. Nothing blocking runs
//! here.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dvs_checkpoint::Criu;
use dvs_config::{ClusterConfig, NodeConfig};
use dvs_core::{ConnId, Input, MigrationRequest, NodeCore, Ticket};
use dvs_wire::peer::{CtlFrame, MigrationId};
use dvs_wire::{DcId, Ep, Errno, NodeId};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::access::{AdminGroup, PeerCred};
use crate::ctl::{CtlRequest, CtlResponse, NodeStatus, ProcStatus};
use crate::dir::DirJob;
use crate::dir::MembersChange;
use crate::launcher::{Ended, LaunchJob, Procs};
use crate::leftovers;
use crate::membership::{Member, MemberCmd, MembershipEvent};
use crate::migrate::{Migrations, RestoreResult};
use crate::peer::{LinkEvent, LinkId, LinkInfo, PeerLink};
use crate::relay::Relays;
use crate::tls::PeerAuth;
use crate::wire::Wire;

/// Events the channel holds before their senders wait: a reader that outpaces the loop
/// stops reading its socket, instead of queueing without bound.
pub(crate) const EVENTS: usize = 1024;

/// Events taken in one round, before what they queued is written.
const ROUND: usize = 256;

/// The way to the event loop.
pub(crate) type Events = mpsc::Sender<Event>;

/// What every task may read: the node's configuration and the way to the event loop. Fixed
/// after start-up, except the peer authentication, which the TLS reloader publishes.
pub(crate) struct Ctx {
    /// The validated cluster config.
    pub cfg: ClusterConfig,
    /// This node.
    pub me: NodeConfig,
    /// Who may send control requests besides root.
    pub admin: AdminGroup,
    /// The umask the node was started with; launched programs get it back (the node itself
    /// runs with 077 so that whatever it creates is private).
    pub app_umask: u32,
    /// The event loop's channel.
    pub events: Events,
    /// TLS material and deny list of the peer links, as last loaded.
    pub auth: watch::Receiver<Arc<PeerAuth>>,
    /// The node lost its membership lease: no peer link until it holds one again.
    pub fenced: Cell<bool>,
    /// Nodes not in the config that joined (hold a lease): dialers of such nodes stop once
    /// they leave.
    pub joined: std::cell::RefCell<std::collections::BTreeSet<NodeId>>,
}

/// What an I/O task or a finished job tells the event loop.
pub(crate) enum Event {
    /// An input for the core as it is: a local request, a directory answer, the outcome of a
    /// migration step.
    Input(Input),
    /// What one read of a local connection decoded (its requests), in order.
    Inputs(Vec<Input>),
    /// A process connected to `ipc.sock`: its socket, its credentials, and its pid followed
    /// by its ancestors' (read from `/proc` off the loop).
    LocalAccepted {
        stream: UnixStream,
        cred: PeerCred,
        ancestors: Vec<i32>,
    },
    /// The reader of local connection `conn` stopped (end of stream, error, malformed frame).
    LocalClosed { conn: ConnId },
    /// Something happened on a peer link.
    Link(LinkEvent),
    /// A control request that reads or changes the node's state.
    Control(Query),
    /// `criu check` ran (on first use, or for `dvs doctor`).
    CriuChecked(Result<Arc<Criu>, String>),
    /// A program's log is open: start the program.
    Launch(LaunchJob),
    /// A launched process ended.
    ProcEnded { pid: i32, ended: Ended },
    /// A criu restore of migration `id` finished.
    CriuRestored {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        result: RestoreResult,
    },
    /// Destination of cooperative migration `id`: the working folder that came with the
    /// snapshot was created here (removed again if the migration rolls back).
    WorkdirUnpacked {
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        unpacked: crate::workdir::Unpacked,
    },
    /// These launched processes' trees held the process that migrated to `to`.
    MigratedAway { launchers: Vec<i32>, to: NodeId },
    /// The deny list changed: close the links whose certificate it revokes now.
    DenyListChanged,
    /// The membership lease was taken or lost.
    Membership(MembershipEvent),
    /// The nodes holding a membership lease changed.
    Members(MembersChange),
    /// Who owns this node's endpoints now, read after a fence (see `membership.rs`).
    Reconciled(crate::dir::Owners),
    /// An answer to a request another node relayed here, to send back to it.
    Relayed { to: NodeId, frame: CtlFrame },
    /// Stop the node (control `shutdown`).
    Shutdown,
}

/// A control request for the event loop; the answer goes back on the `reply` channel.
pub(crate) enum Query {
    /// Links, registrations and processes.
    Status(oneshot::Sender<NodeStatus>),
    /// Processes launched or restored here.
    Ps(oneshot::Sender<Vec<ProcStatus>>),
    /// Register `{dc, ep}` as running on `at` (or its backup there); no answer means the core
    /// gave none.
    Register {
        dc: DcId,
        ep: Ep,
        at: NodeId,
        backup: bool,
        reply: oneshot::Sender<Result<(), Errno>>,
    },
    /// What choosing a backend for migrating `{dc, ep}` needs to know.
    MigrationSource {
        dc: DcId,
        ep: Ep,
        reply: oneshot::Sender<Result<MigrationSource, String>>,
    },
    /// Start a migration; its progress goes to `progress` once accepted.
    StartMigration {
        req: MigrationRequest,
        progress: mpsc::UnboundedSender<CtlResponse>,
        reply: oneshot::Sender<Result<MigrationId, String>>,
    },
    /// Leave the cluster (see `CtlRequest::Leave`); the answer says what was done.
    Leave {
        force: bool,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Relay `request` to node `to`; its answers go to `answers`, which closes after the
    /// last.
    Forward {
        to: NodeId,
        request: CtlRequest,
        answers: mpsc::UnboundedSender<CtlResponse>,
    },
}

/// The endpoint a migration would move, as the event loop knows it.
pub(crate) struct MigrationSource {
    /// Its process.
    pub pid: i32,
    /// The command line it was launched (or restored) with here, if it was.
    pub cmd: Option<Vec<String>>,
    /// Whether criu works here, if that was checked already.
    pub criu: Option<Result<Arc<Criu>, String>>,
    /// Its working folder, which travels with a criu image (`dvs run --workdir`).
    pub workdir: Option<std::path::PathBuf>,
}

/// A control request waiting for the core's report.
pub(crate) enum Waiting {
    /// `Register`, answered by `Report::Registered`.
    Registered(oneshot::Sender<Result<(), Errno>>),
    /// `StartMigration`, answered by `Report::MigrationAccepted`.
    Migration {
        reply: oneshot::Sender<Result<MigrationId, String>>,
        progress: mpsc::UnboundedSender<CtlResponse>,
    },
}

/// The node: the core and every I/O handle, owned by the event loop alone.
pub(crate) struct Node {
    pub core: NodeCore,
    pub ctx: Rc<Ctx>,
    /// Writers of the local connections.
    pub conns: HashMap<ConnId, Rc<Wire>>,
    pub next_conn: ConnId,
    /// The current link to each peer that has one.
    pub peers: HashMap<NodeId, Rc<PeerLink>>,
    /// State of every configured peer's link, for status.
    pub links: HashMap<NodeId, LinkInfo>,
    pub next_link: LinkId,
    /// The directory thread's job queue.
    pub dir: mpsc::UnboundedSender<DirJob>,
    /// Writers with frames queued this round.
    pub dirty: Vec<Rc<Wire>>,
    /// Bounce buffer of local and compressed vcopies.
    pub bounce: Vec<u8>,
    pub procs: Procs,
    pub migrations: Migrations,
    /// Control requests waiting for the core's report, by ticket.
    pub waiting: HashMap<Ticket, Waiting>,
    pub next_ticket: Ticket,
    /// Operator requests relayed to other nodes or served here for them.
    pub relays: Relays,
    /// The membership lease holder (on the directory thread).
    pub membership: mpsc::UnboundedSender<MemberCmd>,
    /// Whether this node holds its membership lease now.
    pub lease_held: bool,
    /// Lost its lease: its endpoints are stopped and it has no link (membership.rs).
    pub fenced: bool,
    /// Every node whose membership the directory shows, and since when that holds.
    pub members: BTreeMap<NodeId, Member>,
    /// The roots of the endpoint trees last recorded for a later run (`leftovers.rs`), and
    /// the thread that writes them.
    pub recorded_trees: Vec<i32>,
    pub tree_recorder: std::sync::mpsc::Sender<Vec<i32>>,
    pub started: Instant,
    /// Set by [`Event::Shutdown`].
    stop: bool,
}

impl Node {
    /// A node around `core`; no connection or link yet.
    pub fn new(
        core: NodeCore,
        ctx: Rc<Ctx>,
        dir: mpsc::UnboundedSender<DirJob>,
        membership: mpsc::UnboundedSender<MemberCmd>,
        migrations: Migrations,
    ) -> Self {
        let ctx_runtime_dir = ctx.me.runtime_dir.clone();
        let links = ctx
            .cfg
            .nodes
            .iter()
            .filter(|n| n.id != ctx.me.id)
            .map(|n| (n.id, LinkInfo::new()))
            .collect();
        Node {
            core,
            ctx,
            conns: HashMap::new(),
            next_conn: 1,
            peers: HashMap::new(),
            links,
            next_link: 0,
            dir,
            dirty: Vec::new(),
            bounce: Vec::new(),
            procs: Procs::default(),
            migrations,
            waiting: HashMap::new(),
            next_ticket: 0,
            relays: Relays::default(),
            membership,
            lease_held: false,
            fenced: false,
            members: BTreeMap::new(),
            recorded_trees: Vec::new(),
            tree_recorder: leftovers::recorder(ctx_runtime_dir),
            started: Instant::now(),
            stop: false,
        }
    }

    /// Runs the loop until [`Event::Shutdown`] (or until every sender is gone).
    pub async fn run(&mut self, events: &mut mpsc::Receiver<Event>) {
        // One sleep, moved to the core's next deadline after every round.
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            let next = self.core.poll_timeout();
            if next != armed {
                armed = next;
                if let Some(t) = next {
                    timer.as_mut().reset(t.into());
                }
            }
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev),
                    None => return,
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.input(Input::Timeout);
                }
            }
            // Whatever else is ready joins this round, so that its frames leave together.
            for _ in 1..ROUND {
                match events.try_recv() {
                    Ok(ev) => self.event(ev),
                    Err(_) => break,
                }
            }
            for w in self.dirty.drain(..) {
                w.flush();
            }
            if self.stop {
                return;
            }
        }
    }

    fn event(&mut self, ev: Event) {
        // Events that can launch, restore or end an endpoint's process tree (the hot ones,
        // IPC and link traffic, cannot).
        let trees_may_change = matches!(
            ev,
            Event::Launch(_)
                | Event::ProcEnded { .. }
                | Event::CriuRestored { .. }
                | Event::MigratedAway { .. }
                | Event::Reconciled(_)
        );
        self.handle_event(ev);
        if trees_may_change {
            self.record_trees();
        }
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Input(input) => self.input(input),
            Event::Inputs(inputs) => self.inputs(inputs),
            Event::LocalAccepted {
                stream,
                cred,
                ancestors,
            } => self.local_accepted(stream, cred, &ancestors),
            Event::LocalClosed { conn } => self.local_closed(conn),
            Event::Link(ev) => self.link_event(ev),
            Event::Control(q) => self.query(q),
            Event::CriuChecked(r) => {
                self.migrations.criu = Some(r);
                self.keep_restorer_ready();
            }
            Event::Launch(job) => self.launch(job),
            Event::ProcEnded { pid, ended } => self.procs.ended(pid, ended),
            Event::CriuRestored { id, dc, ep, result } => self.criu_restored(id, dc, ep, result),
            Event::WorkdirUnpacked {
                id,
                dc,
                ep,
                unpacked,
            } => {
                self.migrations.coop_unpacked.insert(id, (dc, ep, unpacked));
            }
            Event::MigratedAway { launchers, to } => self.procs.migrated_away(&launchers, to),
            Event::DenyListChanged => self.close_revoked_links(),
            Event::Relayed { to, frame } => self.relayed_answer(to, frame),
            Event::Membership(ev) => self.membership_event(ev),
            Event::Members(change) => self.members_changed(change),
            Event::Reconciled(owners) => self.reconciled(owners),
            Event::Shutdown => self.stop = true,
        }
    }

    /// Gives the core `input` now and carries out every action that follows.
    pub fn input(&mut self, input: Input) {
        self.core.handle(Instant::now(), input);
        self.execute_actions();
    }

    /// Gives the core what one read of a local connection decoded, then carries out what
    /// follows: one read's answers are queued together.
    fn inputs(&mut self, inputs: Vec<Input>) {
        let now = Instant::now();
        for input in inputs {
            self.core.handle(now, input);
        }
        self.execute_actions();
    }

    /// Carries out every action the core has: the only place actions are executed.
    pub fn execute_actions(&mut self) {
        while let Some(action) = self.core.poll_action() {
            self.execute(action);
        }
    }

    /// A fresh ticket, to match a request to the core with its report.
    pub fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// The endpoint process `pid` was launched or restored here for, if it was.
    pub fn launched_endpoint(&self, pid: i32) -> Option<(DcId, Ep)> {
        self.procs
            .endpoint_of(pid)
            .or_else(|| self.migrations.restored.get(&pid).map(|r| (r.dc, r.ep)))
    }

    /// Records the roots of the endpoint trees for a later run when they changed.
    fn record_trees(&mut self) {
        let mut roots: Vec<i32> = self.endpoint_trees().into_iter().map(|t| t.0).collect();
        roots.sort_unstable();
        if roots != self.recorded_trees {
            self.recorded_trees = roots.clone();
            let _ = self.tree_recorder.send(roots);
        }
    }

    /// Kills the processes this node launched (on shutdown).
    pub fn kill_all(&mut self) {
        self.procs.kill_all();
    }
}

/// Runs `job` on tokio's blocking pool: how file I/O, criu and `/proc` walks stay off the
/// event loop. A job that panicked is an `Err`.
pub(crate) async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| e.to_string())
}
