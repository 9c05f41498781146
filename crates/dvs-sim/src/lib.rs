//! A deterministic simulation of a cluster of dvs node kernels ([`NodeCore`]s).
//!
//! [`Sim`] plays the daemon around every core: local processes and their connections, the
//! peer links, the directory, memory copies, checkpoints and restores. Everything happens in
//! one thread on a logical clock that only the simulation moves, so a test can drive any IPC
//! or migration path step by step, and a run is a function of its inputs and its seed: the
//! PRNG makes every random choice (which link delivers next when reordering, delays, drops).
//!
//! Hooks for failure tests: cut and heal links, delay or lose frames, crash and restart
//! nodes, slow or hold the directory, inject frames from a node that runs no core (an
//! attacker), and a [`trace`](Sim::trace) of every input and action to compare runs.

#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dvs_core::{Action, ConnId, CoreConfig, Input, LocalPeer, NodeCore, VcopyChunk};
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{BulkFrame, PeerFrame};
use dvs_wire::NodeId;

mod directory;
mod exec;
mod expect;
mod faults;
mod link;
pub mod req;
mod trace;

pub use directory::{DirKind, Directory};
pub use exec::{Outcomes, Restored};
pub use faults::Invariant;
pub use link::LinkConfig;
pub use trace::Event;

use link::{InFlight, Links};

/// A simulated process: connection `conn` to the node kernel of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proc {
    /// The node it runs on.
    pub node: NodeId,
    /// Its connection to that node's kernel (unique across the simulation).
    pub conn: ConnId,
}

/// Steps one [`Sim::pump`] may take before the simulation calls it a livelock: a protocol
/// that bounces frames between nodes forever is a bug, not a hang.
const PUMP_BUDGET: u32 = 1_000_000;

/// A deterministic cluster of [`NodeCore`]s; see the crate documentation.
pub struct Sim {
    start: Instant,
    /// The logical clock: time since `start`.
    elapsed: Duration,
    rng: fastrand::Rng,
    configs: BTreeMap<NodeId, CoreConfig>,
    /// The cores of the nodes that are up.
    cores: BTreeMap<NodeId, NodeCore>,
    /// Nodes that run no core: what is sent to them is kept ([`Sim::received`]).
    phantoms: BTreeSet<NodeId>,
    restarts: BTreeMap<NodeId, u64>,
    links: Links,
    dir: Directory,
    /// Deliver frames during [`Sim::pump`] (else only [`Sim::deliver_one`] does).
    pub auto_route: bool,
    /// Deliver due frames from links drawn at random (per-link order is always kept).
    pub reorder: bool,
    /// Carry out memory copies (they succeed); else they are noted for the test.
    pub auto_memory: bool,
    /// Carry out checkpoints, image transfers and restores; else they are noted.
    pub auto_process: bool,
    /// Checkpoints wait until the test finishes them (a long dump): see
    /// [`Outcomes::held_checkpoints`].
    pub hold_checkpoints: bool,
    /// Keep the trace (on by default).
    pub tracing: bool,
    /// Close a link whose core condemned the peer, and connect it again at once, as the
    /// daemon does (its dialer reconnects); else the `Condemn` is only noted for the test.
    pub close_condemned: bool,
    /// Links condemned, to close and reconnect once the current actions are carried out.
    condemned: Vec<(NodeId, NodeId)>,
    /// Links that went down (cut, condemned, or with a node that crashed) so far.
    disruptions: u64,
    /// Every frame sent, also those lost, as `(from, to, frame)`.
    frames: Vec<(NodeId, NodeId, PeerFrame)>,
    received: BTreeMap<NodeId, Vec<PeerFrame>>,
    responses: BTreeMap<Proc, VecDeque<LocalResponse>>,
    /// Actions the simulation did not carry out (or was told to note anyway).
    noted: Vec<(NodeId, Action)>,
    out: Outcomes,
    next_conn: ConnId,
    tickets: dvs_core::Ticket,
    trace: Vec<Event>,
    /// Checked after every input a core handled (see [`Sim::set_invariant`]).
    invariant: Option<Invariant>,
    /// The first time the invariant did not hold, and why.
    violation: Option<String>,
}

impl Sim {
    /// An empty cluster whose random choices come from `seed`.
    pub fn new(seed: u64) -> Self {
        Sim {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            rng: fastrand::Rng::with_seed(seed),
            configs: BTreeMap::new(),
            cores: BTreeMap::new(),
            phantoms: BTreeSet::new(),
            restarts: BTreeMap::new(),
            links: Links::default(),
            dir: Directory::default(),
            auto_route: true,
            reorder: false,
            auto_memory: true,
            auto_process: true,
            hold_checkpoints: false,
            tracing: true,
            close_condemned: false,
            condemned: Vec::new(),
            disruptions: 0,
            frames: Vec::new(),
            received: BTreeMap::new(),
            responses: BTreeMap::new(),
            noted: Vec::new(),
            out: Outcomes::default(),
            next_conn: 1,
            tickets: 0,
            trace: Vec::new(),
            invariant: None,
            violation: None,
        }
    }

    /// A cluster of one node per config, every link up.
    pub fn with_nodes(seed: u64, configs: impl IntoIterator<Item = CoreConfig>) -> Self {
        let mut s = Sim::new(seed);
        for cfg in configs {
            s.add_node(cfg);
        }
        let nodes: Vec<NodeId> = s.configs.keys().copied().collect();
        for (i, &a) in nodes.iter().enumerate() {
            for &b in &nodes[i + 1..] {
                s.link_up(a, b);
            }
        }
        s
    }

    /// Adds a node running a fresh core; no link is up yet.
    pub fn add_node(&mut self, cfg: CoreConfig) {
        let node = cfg.node;
        self.cores.insert(node, NodeCore::new(cfg.clone()));
        self.configs.insert(node, cfg);
    }

    /// Adds a node that runs no core: frames sent to it are kept ([`Sim::received`]), and
    /// the test speaks for it with [`Sim::inject`].
    pub fn add_phantom(&mut self, node: NodeId) {
        self.phantoms.insert(node);
    }

    // ----- time ----------------------------------------------------------------------------

    /// The simulated time now.
    pub fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    /// Simulated time since the simulation started.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// When the next thing is due (a core's timer, a frame, a directory answer), as time
    /// since the start; `None` if nothing is pending. A driver can jump the clock there
    /// instead of stepping through idle time.
    pub fn next_due(&self) -> Option<Duration> {
        self.next_event(true)
    }

    /// The earliest thing due: a core's timer, a frame, a directory answer.
    fn next_event(&self, timers: bool) -> Option<Duration> {
        let timer = timers
            .then(|| self.cores.values().filter_map(|c| c.poll_timeout()).min())
            .flatten()
            .map(|t| self.offset(t));
        let frame = self.auto_route.then(|| self.links.next_due()).flatten();
        [timer, frame, self.dir_next_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves the clock `d` forward, handing every timer, frame and directory answer to its
    /// node at its own time on the way.
    pub fn advance(&mut self, d: Duration) {
        let end = self.elapsed + d;
        self.run_until(end, true);
        self.elapsed = end;
        self.pump();
    }

    /// [`Sim::advance`] in milliseconds.
    pub fn advance_ms(&mut self, ms: u64) {
        self.advance(Duration::from_millis(ms));
    }

    /// Runs until nothing is left but timers and held requests: frames and directory answers
    /// that are delayed arrive (the clock moves to them, firing the timers due before).
    pub fn settle(&mut self) {
        self.run_until(Duration::MAX, false);
    }

    fn run_until(&mut self, end: Duration, with_timers: bool) {
        loop {
            self.pump();
            let Some(next) = self.next_event(with_timers) else {
                return;
            };
            if next > end {
                return;
            }
            // Timers due before the next frame or answer fire first, in order.
            self.fire_timers_until(next);
            self.elapsed = self.elapsed.max(next);
        }
    }

    /// Hands `Timeout` to every core with a timer due by `until`, in time order.
    fn fire_timers_until(&mut self, until: Duration) {
        loop {
            self.pump();
            let due = self
                .cores
                .iter()
                .filter_map(|(n, c)| c.poll_timeout().map(|t| (self.offset(t), *n)))
                .filter(|(t, _)| *t <= until)
                .min();
            let Some((t, node)) = due else { return };
            self.elapsed = self.elapsed.max(t);
            self.input(node, Input::Timeout);
        }
    }

    // ----- the cores -----------------------------------------------------------------------

    /// The core of `node` (it must be up), for queries.
    #[track_caller]
    pub fn core(&self, node: NodeId) -> &NodeCore {
        self.cores.get(&node).expect("a node that is up")
    }

    /// Whether `node` runs a core now (not crashed, not a phantom).
    pub fn is_alive(&self, node: NodeId) -> bool {
        self.cores.contains_key(&node)
    }

    /// The nodes that run a core now.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.cores.keys().copied().collect()
    }

    /// Hands `input` to `node` at the simulated time, without carrying out what follows
    /// (see [`Sim::pump`]). Nothing happens if the node is down.
    pub fn input(&mut self, node: NodeId, input: Input) {
        let now = self.now();
        if !self.cores.contains_key(&node) {
            return;
        }
        if self.tracing {
            self.trace.push(Event::input(self.elapsed, node, &input));
        }
        self.cores
            .get_mut(&node)
            .expect("checked")
            .handle(now, input);
        self.check_invariant(node);
    }

    /// Takes the actions `node` queued, without carrying them out.
    pub fn take_actions(&mut self, node: NodeId) -> Vec<Action> {
        let mut acts = Vec::new();
        while let Some(a) = self.cores.get_mut(&node).and_then(|c| c.poll_action()) {
            if self.tracing {
                self.trace.push(Event::action(self.elapsed, node, &a));
            }
            acts.push(a);
        }
        acts
    }

    /// Carries out every action of every core, and delivers what is due (frames, if
    /// [`Sim::auto_route`]; directory answers), until nothing moves at this time.
    #[track_caller]
    pub fn pump(&mut self) {
        let mut budget = PUMP_BUDGET;
        loop {
            budget = budget
                .checked_sub(1)
                .expect("livelock: the nodes never go idle");
            let mut acts = Vec::new();
            for n in self.nodes() {
                acts.extend(self.take_actions(n).into_iter().map(|a| (n, a)));
            }
            if !acts.is_empty() {
                for (n, a) in acts {
                    self.carry_out(n, a);
                }
                continue;
            }
            if let Some((a, b)) = self.condemned.pop() {
                self.reconnect(a, b);
                continue;
            }
            if self.land_one_due() {
                continue;
            }
            if self.auto_route && self.deliver_one() {
                continue;
            }
            return;
        }
    }

    // ----- links ---------------------------------------------------------------------------

    /// Whether the link between `a` and `b` is up (it may be up with a node crashed: it
    /// comes back when the node restarts).
    pub fn is_up(&self, a: NodeId, b: NodeId) -> bool {
        self.links.is_up(a, b)
    }

    /// Brings the link between `a` and `b` up: both ends learn it. With one end crashed,
    /// nothing connects until it restarts ([`Sim::restart`] brings its links up then).
    pub fn link_up(&mut self, a: NodeId, b: NodeId) {
        self.links.set_up(a, b);
        let crashed = |n| self.configs.contains_key(&n) && !self.cores.contains_key(&n);
        if crashed(a) || crashed(b) {
            return;
        }
        self.input(a, Input::LinkUp { node: b });
        self.input(b, Input::LinkUp { node: a });
        self.pump();
    }

    /// How many times a link went down so far: cut, closed after a condemnation, or lost
    /// with a node that crashed. Between two equal counts every link kept its order and lost
    /// nothing.
    pub fn disruptions(&self) -> u64 {
        self.disruptions
    }

    /// A condemned link closes (what was in flight is lost) and the dialer connects again.
    fn reconnect(&mut self, a: NodeId, b: NodeId) {
        if !self.links.is_up(a, b) {
            return;
        }
        self.disruptions += 1;
        let lost = self.links.set_down(a, b);
        self.lost(lost);
        self.input(a, Input::LinkDown { node: b });
        self.input(b, Input::LinkDown { node: a });
        self.link_up(a, b);
    }

    /// Cuts the link between `a` and `b`: what was in flight on it is lost, both ends learn.
    pub fn link_down(&mut self, a: NodeId, b: NodeId) {
        self.disruptions += 1;
        let lost = self.links.set_down(a, b);
        self.lost(lost);
        self.input(a, Input::LinkDown { node: b });
        self.input(b, Input::LinkDown { node: a });
        self.pump();
    }

    /// Sets how the link between `a` and `b` behaves (both ways).
    pub fn set_link(&mut self, a: NodeId, b: NodeId, cfg: LinkConfig) {
        self.links.set_config(a, b, cfg);
    }

    /// Sets how every link without its own [`Sim::set_link`] behaves.
    pub fn set_default_link(&mut self, cfg: LinkConfig) {
        self.links.default = cfg;
    }

    fn lost(&mut self, lost: Vec<InFlight>) {
        if self.tracing {
            for f in lost {
                self.trace.push(Event::Lost {
                    at: self.elapsed,
                    from: f.from,
                    to: f.to,
                    frame: f.frame,
                });
            }
        }
    }

    pub(crate) fn send_frame(&mut self, from: NodeId, to: NodeId, frame: PeerFrame, data: Bytes) {
        self.frames.push((from, to, frame.clone()));
        let reachable = self.links.is_up(from, to)
            && (self.cores.contains_key(&to) || self.phantoms.contains(&to));
        let sent = reachable
            && self
                .links
                .send(self.elapsed, from, to, frame.clone(), data, &mut self.rng)
                .is_some();
        if !sent {
            self.lost(vec![InFlight {
                seq: 0,
                due: self.elapsed,
                from,
                to,
                frame,
                data: Bytes::new(),
            }]);
        }
    }

    /// Delivers the next frame due (see [`Sim::reorder`]) and carries out nothing else;
    /// false if none was due.
    pub fn deliver_one(&mut self) -> bool {
        let Some(f) = self.links.pop(self.elapsed, self.reorder, &mut self.rng) else {
            return false;
        };
        if self.phantoms.contains(&f.to) {
            if self.tracing {
                self.trace.push(Event::Received {
                    at: self.elapsed,
                    node: f.to,
                    from: f.from,
                    frame: f.frame.clone(),
                });
            }
            self.received.entry(f.to).or_default().push(f.frame);
            return true;
        }
        let input = match &f.frame {
            // The daemon reads a vcopy chunk's bytes off the link with its header.
            PeerFrame::Bulk(BulkFrame::VcopyData(d)) => {
                let len = if f.data.is_empty() {
                    d.total - d.offset
                } else {
                    f.data.len() as u64
                };
                match VcopyChunk::from_frame(&f.frame, len) {
                    Some(chunk) => Input::VcopyChunk {
                        from: f.from,
                        chunk,
                        data: f.data,
                    },
                    None => Input::PeerFrame {
                        from: f.from,
                        frame: f.frame,
                    },
                }
            }
            _ => Input::PeerFrame {
                from: f.from,
                frame: f.frame,
            },
        };
        self.input(f.to, input);
        true
    }

    /// Delivers every frame due (and carries out what follows).
    pub fn deliver_all(&mut self) {
        while self.deliver_one() {
            self.pump();
        }
        self.pump();
    }

    /// Hands `frame` to `to` as if `from` had sent it, at once, and carries out what
    /// follows: the way to speak for a phantom node (an attacker).
    pub fn inject(&mut self, from: NodeId, to: NodeId, frame: PeerFrame) {
        self.input(to, Input::PeerFrame { from, frame });
        self.pump();
    }

    /// Hands vcopy chunk `chunk` from `from` to `to` (zero bytes), and returns the pid `to`
    /// asks to write it into; that write is left to the test (answer it with
    /// `Input::VcopyChunkWritten`). Every other action is carried out.
    pub fn inject_chunk(&mut self, from: NodeId, to: NodeId, chunk: &VcopyChunk) -> Option<i32> {
        let data = Bytes::from(vec![0u8; chunk.len as usize]);
        self.input(
            to,
            Input::VcopyChunk {
                from,
                chunk: *chunk,
                data,
            },
        );
        let mut pid = None;
        for a in self.take_actions(to) {
            match a {
                Action::Memory(dvs_core::MemoryAction::WriteChunk { pid: p, .. }) => pid = Some(p),
                other => self.carry_out(to, other),
            }
        }
        pid
    }

    /// Every frame in flight, in sending order, as `(from, to, frame)`.
    pub fn in_flight(&self) -> Vec<(NodeId, NodeId, &PeerFrame)> {
        self.links
            .in_flight()
            .into_iter()
            .map(|f| (f.from, f.to, &f.frame))
            .collect()
    }

    /// Every frame sent since the last call, also those lost, as `(from, to, frame)`.
    pub fn take_frames(&mut self) -> Vec<(NodeId, NodeId, PeerFrame)> {
        std::mem::take(&mut self.frames)
    }

    /// Frames delivered to the phantom `node` (oldest first).
    pub fn received(&self, node: NodeId) -> &[PeerFrame] {
        self.received.get(&node).map_or(&[], |v| v)
    }

    /// Forgets the frames delivered to the phantom `node`.
    pub fn clear_received(&mut self, node: NodeId) {
        self.received.remove(&node);
    }

    // ----- processes -----------------------------------------------------------------------

    /// The pid the simulation gives the process `p`.
    pub fn pid(p: Proc) -> i32 {
        1000 + p.conn as i32
    }

    fn new_proc(&mut self, node: NodeId) -> Proc {
        let p = Proc {
            node,
            conn: self.next_conn,
        };
        self.next_conn += 1;
        p
    }

    /// A new, unbound process on `node` (uid 0, not launched by the node).
    pub fn connect(&mut self, node: NodeId) -> Proc {
        let p = self.new_proc(node);
        self.input(
            node,
            Input::LocalConnect {
                conn: p.conn,
                peer: LocalPeer::unlaunched(Self::pid(p), 0),
            },
        );
        p
    }

    /// A new, unbound process on `node` running as `uid`, launched by the node for
    /// `launched_for` (if any).
    pub fn connect_as(
        &mut self,
        node: NodeId,
        uid: u32,
        launched_for: Option<(dvs_wire::DcId, dvs_wire::Ep)>,
    ) -> Proc {
        let p = self.new_proc(node);
        let peer = LocalPeer {
            pid: Self::pid(p),
            uid,
            launched_for,
        };
        self.input(node, Input::LocalConnect { conn: p.conn, peer });
        p
    }

    /// A new, unbound process on `node` with the given identity (pid included).
    pub fn connect_peer(&mut self, node: NodeId, peer: LocalPeer) -> Proc {
        let p = self.new_proc(node);
        self.input(node, Input::LocalConnect { conn: p.conn, peer });
        p
    }

    /// `p` sends request `req`; everything that follows at once is carried out.
    pub fn call(&mut self, p: Proc, req: LocalRequest) {
        self.input(p.node, Input::LocalRequest { conn: p.conn, req });
        self.pump();
    }

    /// `p` disconnects (exits).
    pub fn disconnect(&mut self, p: Proc) {
        self.input(p.node, Input::LocalDisconnect { conn: p.conn });
        self.pump();
    }

    /// The oldest response to `p` not taken yet.
    pub fn resp(&mut self, p: Proc) -> Option<LocalResponse> {
        self.responses.get_mut(&p).and_then(|q| q.pop_front())
    }

    /// Every response not taken yet, per process.
    pub fn take_responses(&mut self) -> BTreeMap<Proc, VecDeque<LocalResponse>> {
        std::mem::take(&mut self.responses)
    }

    // ----- the directory and what the sim carried out --------------------------------------

    /// The directory.
    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// The directory, to change its contents or how it answers.
    pub fn directory_mut(&mut self) -> &mut Directory {
        &mut self.dir
    }

    /// Actions not carried out since the last call (or noted anyway), in order.
    pub fn take_noted(&mut self) -> Vec<(NodeId, Action)> {
        std::mem::take(&mut self.noted)
    }

    /// What the simulated daemons did on the cores' behalf (reports, kills, restores).
    pub fn outcomes(&self) -> &Outcomes {
        &self.out
    }

    /// Everything handed to the cores and every action they took, in order.
    pub fn trace(&self) -> &[Event] {
        &self.trace
    }
}
