//! Unit tests of the node kernel core ([`NodeCore`]) through its public API, without sockets.
//!
//! [`Sim`] is a deterministic simulation of a 3-node cluster: it plays the daemon around each
//! core (local connections, the directory, peer links) and routes `PeerAction::Send` frames to the
//! other cores in FIFO order, so every IPC path, local or remote, runs as in production but in
//! one thread and with a simulated clock.

mod support;
use support::Drive;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use dvs_core::{
    Action, ConnId, CoreConfig, DcInfo, LocalPeer, NodeCore, Registration, RegistrationKind,
    VcopyChunk, VcopyCompletion, VCOPY_MAX,
};
use dvs_core::{DirRequest, LocalAction, MemoryAction, PeerAction};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::message::NOTIFY_MTYPE;
use dvs_wire::peer::{
    Bound, BulkFrame, Cancel, Deliver, Delivered, IpcFrame, MigrFrame, MigrStart, Notify, Reply,
    Unbound, VcopyData, VcopyDone, VcopyPull,
};
use dvs_wire::peer::{DeliverKind, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, Message, NodeId, Timeout, PROTOCOL_VERSION};

// ----- the simulation ----------------------------------------------------------------------

/// DC spanning nodes 1, 2 and 3.
const DC: DcId = 1;
/// DC spanning nodes 1 and 2 only, with a queue limit of 2.
const DC2: DcId = 2;
/// A DC that does not exist.
const NO_DC: DcId = 9;
/// Endpoints of every DC are `0..MAX_EP`.
const MAX_EP: u32 = 16;
const NODES: [NodeId; 3] = [1, 2, 3];

fn config(node: NodeId) -> CoreConfig {
    CoreConfig {
        node,
        dcs: vec![
            DcInfo {
                id: DC,
                nodes: BTreeSet::from([1, 2, 3]),
                max_endpoints: MAX_EP,
                max_queue: 8,
                bind_uids: BTreeSet::from([0]),
            },
            DcInfo {
                id: DC2,
                nodes: BTreeSet::from([1, 2]),
                max_endpoints: MAX_EP,
                max_queue: 2,
                bind_uids: BTreeSet::from([0, 1000]),
            },
        ],
        migration_seed: 0,
    }
}

/// A simulated process: connection `conn` to the node kernel of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct P {
    node: NodeId,
    conn: ConnId,
}

/// A deterministic cluster of [`NodeCore`]s with a shared directory and simulated links.
struct Sim {
    now: Instant,
    cores: BTreeMap<NodeId, NodeCore>,
    /// The directory: where each `{dc, ep}` is bound.
    dir: HashMap<(DcId, Ep), NodeId>,
    /// Links that are up, as `(low, high)` node pairs.
    links: BTreeSet<(NodeId, NodeId)>,
    /// Frames sent but not delivered yet, in sending order.
    in_flight: VecDeque<(NodeId, NodeId, PeerFrame)>,
    /// Deliver frames as soon as they are sent (else only by [`Sim::deliver_one`]).
    auto_route: bool,
    /// Leave `DirRequest::Register` to the test (in `others`) instead of answering from `dir`.
    manual_register: bool,
    /// Leave `DirRequest::Lookup` to the test (in `others`) instead of answering from `dir`.
    manual_lookup: bool,
    /// Carry out `VcopyLocal` (success) and `VcopyStream` (one `VcopyData` frame) itself.
    auto_vcopy: bool,
    /// Every frame ever sent (also those dropped on a down link), as `(from, to, frame)`.
    frames: Vec<(NodeId, NodeId, PeerFrame)>,
    /// Responses not yet taken by the test, per process.
    responses: BTreeMap<P, VecDeque<LocalResponse>>,
    /// Other actions the simulation does not carry out itself (or records anyway: Unregister).
    others: Vec<(NodeId, Action)>,
    next_conn: ConnId,
}

impl Sim {
    /// Three nodes, every link up, nothing bound.
    fn new() -> Self {
        let mut s = Sim {
            now: Instant::now(),
            cores: NODES
                .iter()
                .map(|&n| (n, NodeCore::new(config(n))))
                .collect(),
            dir: HashMap::new(),
            links: BTreeSet::new(),
            in_flight: VecDeque::new(),
            auto_route: true,
            manual_register: false,
            manual_lookup: false,
            auto_vcopy: false,
            frames: Vec::new(),
            responses: BTreeMap::new(),
            others: Vec::new(),
            next_conn: 1,
        };
        for a in NODES {
            for b in NODES {
                if a < b {
                    s.link_up(a, b);
                }
            }
        }
        s.frames.clear();
        s
    }

    fn core(&mut self, n: NodeId) -> &mut NodeCore {
        self.cores.get_mut(&n).expect("node exists")
    }

    fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
        (a.min(b), a.max(b))
    }

    fn is_up(&self, a: NodeId, b: NodeId) -> bool {
        self.links.contains(&Self::pair(a, b))
    }

    /// Carries out every action of every core until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut acts = Vec::new();
            for (n, core) in self.cores.iter_mut() {
                while let Some(a) = core.poll_action() {
                    acts.push((*n, a));
                }
            }
            if !acts.is_empty() {
                for (n, a) in acts {
                    self.handle_action(n, a);
                }
                continue;
            }
            if self.auto_route && self.deliver_one() {
                continue;
            }
            break;
        }
    }

    fn handle_action(&mut self, n: NodeId, a: Action) {
        let now = self.now;
        match a {
            Action::Local(LocalAction::Respond { conn, resp }) => self
                .responses
                .entry(P { node: n, conn })
                .or_default()
                .push_back(resp),
            Action::Peer(PeerAction::Send { node, frame }) => self.send_frame(n, node, frame),
            Action::Directory(DirRequest::Register { conn, dc, ep }) if !self.manual_register => {
                // The directory refuses a key held by another node; a key naming this node
                // passes (the core itself catches two local connections racing).
                let result = match self.dir.get(&(dc, ep)) {
                    Some(&m) if m != n => Err(Errno::AlreadyBound),
                    _ => {
                        self.dir.insert((dc, ep), n);
                        Ok(())
                    }
                };
                self.core(n).on_register_result(conn, result);
            }
            Action::Directory(DirRequest::Lookup { dc, ep }) if !self.manual_lookup => {
                let at = self.dir.get(&(dc, ep)).copied();
                self.core(n).on_lookup_result(dc, ep, at, now);
            }
            Action::Directory(DirRequest::Unregister { dc, ep }) => {
                if self.dir.get(&(dc, ep)) == Some(&n) {
                    self.dir.remove(&(dc, ep));
                }
                self.others
                    .push((n, Action::Directory(DirRequest::Unregister { dc, ep })));
            }
            // The directory here is synchronous: everything before has landed.
            Action::Directory(DirRequest::Sync { conn }) => self.core(n).on_directory_synced(conn),
            Action::Memory(MemoryAction::CopyLocal { done, .. }) if self.auto_vcopy => {
                self.core(n).on_vcopy_local_done(done, Ok(()))
            }
            Action::Memory(MemoryAction::Stream {
                len,
                to,
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
                ..
            }) if self.auto_vcopy => {
                let frame = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
                    op,
                    caller_node,
                    dc,
                    caller,
                    dst,
                    dst_addr,
                    offset: 0,
                    total: len,
                }));
                self.send_frame(n, to, frame);
            }
            other => self.others.push((n, other)),
        }
    }

    fn send_frame(&mut self, from: NodeId, to: NodeId, frame: PeerFrame) {
        self.frames.push((from, to, frame.clone()));
        if self.is_up(from, to) {
            self.in_flight.push_back((from, to, frame));
        }
    }

    /// Delivers the oldest frame in flight; false if there was none.
    fn deliver_one(&mut self) -> bool {
        let Some((from, to, frame)) = self.in_flight.pop_front() else {
            return false;
        };
        let now = self.now;
        match frame {
            // The daemon's part: write the chunk (always one chunk here) into the process.
            PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { offset, total, .. })) => {
                let c = VcopyChunk::from_frame(&frame, total - offset).expect("a chunk");
                if self.vcopy_chunk(to, from, &c).is_some() {
                    self.core(to).on_vcopy_chunk_written(from, &c, Ok(()));
                }
            }
            frame => self.core(to).on_peer_frame(from, frame, now),
        }
        true
    }

    /// Node `node` gets vcopy chunk `c` from `from`: the pid it would write the data into
    /// (other actions it takes meanwhile are carried out as usual).
    fn vcopy_chunk(&mut self, node: NodeId, from: NodeId, c: &VcopyChunk) -> Option<i32> {
        let (pid, rest) = support::vcopy_chunk(self.core(node), from, c);
        for a in rest {
            self.handle_action(node, a);
        }
        pid
    }

    /// Delivers every frame in flight (and what follows from them).
    fn deliver_all(&mut self) {
        while self.deliver_one() {
            self.pump();
        }
        self.pump();
    }

    /// Hands `frame` to node `to` as if `from` had sent it.
    fn inject(&mut self, from: NodeId, to: NodeId, frame: PeerFrame) {
        let now = self.now;
        self.core(to).on_peer_frame(from, frame, now);
        self.pump();
    }

    /// Moves the clock `ms` forward, firing every timer in time order on the way.
    fn advance(&mut self, ms: u64) {
        let end = self.now + Duration::from_millis(ms);
        loop {
            self.pump();
            let next = self.cores.values().filter_map(|c| c.poll_timeout()).min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    for c in self.cores.values_mut() {
                        c.handle_timeout(now);
                    }
                }
                _ => break,
            }
        }
        self.now = end;
        self.pump();
    }

    fn link_down(&mut self, a: NodeId, b: NodeId) {
        self.links.remove(&Self::pair(a, b));
        // A broken link loses what was in flight on it.
        self.in_flight
            .retain(|(f, t, _)| Self::pair(*f, *t) != Self::pair(a, b));
        self.core(a).on_link_down(b);
        self.core(b).on_link_down(a);
        self.pump();
    }

    fn link_up(&mut self, a: NodeId, b: NodeId) {
        self.links.insert(Self::pair(a, b));
        self.core(a).on_link_up(b);
        self.core(b).on_link_up(a);
        self.pump();
    }

    fn pid(p: P) -> i32 {
        1000 + p.conn as i32
    }

    /// A new, unbound process on `node`.
    fn connect(&mut self, node: NodeId) -> P {
        let p = P {
            node,
            conn: self.next_conn,
        };
        self.next_conn += 1;
        self.core(node)
            .on_local_connect(p.conn, LocalPeer::unlaunched(Self::pid(p), 0));
        p
    }

    /// A new, unbound process on `node` running as `uid`, launched by the node for
    /// `launched_for` (if any).
    fn connect_as(&mut self, node: NodeId, uid: u32, launched_for: Option<(DcId, Ep)>) -> P {
        let p = P {
            node,
            conn: self.next_conn,
        };
        self.next_conn += 1;
        let peer = LocalPeer {
            pid: Self::pid(p),
            uid,
            launched_for,
        };
        self.core(node).on_local_connect(p.conn, peer);
        p
    }

    /// A new process on `node` bound to `{dc, ep}` (the directory accepts).
    #[track_caller]
    fn bind(&mut self, node: NodeId, dc: DcId, ep: Ep) -> P {
        let p = self.connect(node);
        self.call(p, bind(dc, ep));
        self.expect(p, LocalResponse::Ep { dc, ep, node });
        p
    }

    /// `p` sends request `req`; everything that follows at once is carried out.
    fn call(&mut self, p: P, req: LocalRequest) {
        let now = self.now;
        self.core(p.node).on_local_request(p.conn, req, now);
        self.pump();
    }

    /// The directory's answer to a `Lookup` of node `n`, given by hand.
    fn lookup_result(&mut self, n: NodeId, dc: DcId, ep: Ep, at: Option<NodeId>) {
        let now = self.now;
        self.core(n).on_lookup_result(dc, ep, at, now);
        self.pump();
    }

    fn disconnect(&mut self, p: P) {
        self.core(p.node).on_local_disconnect(p.conn);
        self.pump();
    }

    /// The oldest response to `p` not taken yet.
    fn resp(&mut self, p: P) -> Option<LocalResponse> {
        self.responses.get_mut(&p).and_then(|q| q.pop_front())
    }

    #[track_caller]
    fn expect(&mut self, p: P, want: LocalResponse) {
        assert_eq!(self.resp(p), Some(want), "response to {p:?}");
    }

    #[track_caller]
    fn expect_err(&mut self, p: P, e: Errno) {
        self.expect(p, LocalResponse::Err(e));
    }

    #[track_caller]
    fn expect_done(&mut self, p: P) {
        self.expect(p, LocalResponse::Done);
    }

    /// `p` got a message: returns it.
    #[track_caller]
    fn expect_msg(&mut self, p: P) -> Message {
        match self.resp(p) {
            Some(LocalResponse::Msg(m)) => m,
            other => panic!("{p:?} expected a message, got {other:?}"),
        }
    }

    /// `p` got a message from `source` of type `mtype`.
    #[track_caller]
    fn expect_msg_from(&mut self, p: P, source: Ep, mtype: i32) -> Message {
        let m = self.expect_msg(p);
        assert_eq!((m.source, m.mtype), (source, mtype), "message to {p:?}");
        m
    }

    /// `p` has no response (it is still blocked, or never asked).
    #[track_caller]
    fn idle(&mut self, p: P) {
        assert_eq!(self.resp(p), None, "{p:?} should have no response");
    }

    fn take_frames(&mut self) -> Vec<(NodeId, NodeId, PeerFrame)> {
        std::mem::take(&mut self.frames)
    }

    fn take_others(&mut self) -> Vec<(NodeId, Action)> {
        std::mem::take(&mut self.others)
    }
}

// ----- request shorthands ------------------------------------------------------------------

fn msg(mtype: i32) -> Message {
    Message::new(mtype)
}

fn bind(dc: DcId, ep: Ep) -> LocalRequest {
    LocalRequest::Bind {
        version: PROTOCOL_VERSION,
        dc,
        ep,
    }
}

fn send(dst: Ep, mtype: i32, timeout: Timeout) -> LocalRequest {
    LocalRequest::Send {
        dst,
        msg: msg(mtype),
        timeout,
    }
}

fn sendrec(dst: Ep, mtype: i32, timeout: Timeout) -> LocalRequest {
    LocalRequest::SendRec {
        dst,
        msg: msg(mtype),
        timeout,
    }
}

fn recv(src: Source, timeout: Timeout) -> LocalRequest {
    LocalRequest::Receive { src, timeout }
}

fn any() -> LocalRequest {
    recv(Source::Any, Timeout::Forever)
}

fn from(ep: Ep) -> LocalRequest {
    recv(Source::Ep(ep), Timeout::Forever)
}

fn reply(dst: Ep, mtype: i32) -> LocalRequest {
    LocalRequest::Reply {
        dst,
        msg: msg(mtype),
    }
}

fn notify(dst: Ep, value: u64) -> LocalRequest {
    LocalRequest::Notify { dst, value }
}

const SRC_ADDR: u64 = 0x1000;
const DST_ADDR: u64 = 0x8000;

/// Chunk `offset..offset + len` of a `total`-byte vcopy `op` of `{dc, caller}` on
/// `caller_node`, into `dst` at `DST_ADDR`.
#[allow(clippy::too_many_arguments)]
fn chunk(
    op: u64,
    caller_node: NodeId,
    dc: DcId,
    caller: Ep,
    dst: Ep,
    offset: u64,
    len: u64,
    total: u64,
) -> VcopyChunk {
    VcopyChunk {
        op,
        caller_node,
        dc,
        caller,
        dst,
        dst_addr: DST_ADDR,
        offset,
        total,
        len,
    }
}

fn vcopy(src: Ep, dst: Ep, len: u64, timeout: Timeout) -> LocalRequest {
    LocalRequest::Vcopy {
        src,
        src_addr: SRC_ADDR,
        dst,
        dst_addr: DST_ADDR,
        len,
        timeout,
    }
}

fn wait_bind(ep: Ep, timeout: Timeout) -> LocalRequest {
    LocalRequest::WaitForBind { ep, timeout }
}

const FOREVER: Timeout = Timeout::Forever;
const NOWAIT: Timeout = Timeout::NoWait;

// ----- bind --------------------------------------------------------------------------------

#[test]
fn bind_registers_locally_in_the_directory_and_at_peers() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 3);
    assert_eq!(
        s.core(1).registrations(),
        vec![(DC, 3, Registration::Local { conn: a.conn })]
    );
    assert_eq!(s.core(1).local_pid(DC, 3), Some(Sim::pid(a)));
    assert_eq!(s.dir.get(&(DC, 3)), Some(&1));
    let bound = s.take_frames();
    assert_eq!(
        bound,
        vec![
            (
                1,
                2,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 3 }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 3 }))
            )
        ]
    );
    for n in [2, 3] {
        assert_eq!(
            s.core(n).registrations(),
            vec![(DC, 3, Registration::Remote { node: 1 })]
        );
        assert_eq!(s.core(n).local_pid(DC, 3), None);
    }
    s.call(a, LocalRequest::GetEp);
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 3,
            node: 1,
        },
    );

    // A DC of nodes 1 and 2 only is announced to node 2 only.
    s.bind(2, DC2, 3);
    assert_eq!(
        s.take_frames(),
        vec![(
            2,
            1,
            PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC2, ep: 3 }))
        )]
    );
    assert_eq!(
        s.core(3).registrations(),
        vec![(DC, 3, Registration::Remote { node: 1 })]
    );
    assert_eq!(s.core(1).node_id(), 1);
}

#[test]
fn bind_argument_errors() {
    let mut s = Sim::new();
    let a = s.connect(1);
    s.call(
        a,
        LocalRequest::Bind {
            version: PROTOCOL_VERSION + 1,
            dc: DC,
            ep: 1,
        },
    );
    s.expect_err(a, Errno::Invalid);
    s.call(a, bind(NO_DC, 1));
    s.expect_err(a, Errno::NoSuchDc);
    s.call(a, bind(DC, MAX_EP as Ep));
    s.expect_err(a, Errno::BadEndpoint);
    s.call(a, bind(DC, -1));
    s.expect_err(a, Errno::BadEndpoint);
    let c = s.connect(3);
    s.call(c, bind(DC2, 1));
    s.expect_err(c, Errno::NodeNotInDc);
    // None of them registered anything.
    assert!(s.dir.is_empty());
    assert!(s.core(1).registrations().is_empty());
    assert!(s.take_frames().is_empty());
    // The connection is still usable.
    s.call(a, bind(DC, 1));
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 1,
            node: 1,
        },
    );
}

#[test]
fn bind_already_bound_locally_and_conn_already_bound() {
    let mut s = Sim::new();
    s.manual_register = true;
    let a = s.connect(1);
    s.call(a, bind(DC, 1));
    let regs = s.take_others();
    assert_eq!(
        regs,
        vec![(
            1,
            Action::Directory(DirRequest::Register {
                conn: a.conn,
                dc: DC,
                ep: 1
            })
        )]
    );
    s.core(1).on_register_result(a.conn, Ok(()));
    s.pump();
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 1,
            node: 1,
        },
    );

    // Same endpoint, another local connection: refused without asking the directory.
    let b = s.connect(1);
    s.call(b, bind(DC, 1));
    s.expect_err(b, Errno::AlreadyBound);
    assert!(s.take_others().is_empty());
    // The same connection binding again.
    s.call(a, bind(DC, 2));
    s.expect_err(a, Errno::ConnAlreadyBound);
    s.call(a, bind(DC, 1));
    s.expect_err(a, Errno::ConnAlreadyBound);
    assert!(s.take_others().is_empty());
}

#[test]
fn bind_refused_by_the_directory() {
    let mut s = Sim::new();
    s.bind(1, DC, 1);
    // Node 2 only knows ep 1 as REMOTE: the directory decides, and refuses.
    let c = s.connect(2);
    s.call(c, bind(DC, 1));
    s.expect_err(c, Errno::AlreadyBound);
    assert_eq!(
        s.core(2).registrations(),
        vec![(DC, 1, Registration::Remote { node: 1 })]
    );
    s.call(c, LocalRequest::GetEp);
    s.expect_err(c, Errno::NotBound);
    // Any other error of the directory is passed through.
    s.manual_register = true;
    s.call(c, bind(DC, 2));
    assert_eq!(
        s.take_others(),
        vec![(
            2,
            Action::Directory(DirRequest::Register {
                conn: c.conn,
                dc: DC,
                ep: 2
            })
        )]
    );
    s.core(2).on_register_result(c.conn, Err(Errno::Permission));
    s.pump();
    s.expect_err(c, Errno::Permission);
    assert!(s.core(2).registrations().iter().all(|(_, ep, _)| *ep != 2));
    // And the connection can try again.
    s.manual_register = false;
    s.call(c, bind(DC, 2));
    s.expect(
        c,
        LocalResponse::Ep {
            dc: DC,
            ep: 2,
            node: 2,
        },
    );
}

#[test]
fn two_local_binds_racing_for_one_endpoint() {
    let mut s = Sim::new();
    s.manual_register = true;
    let a = s.connect(1);
    let b = s.connect(1);
    s.call(a, bind(DC, 4));
    s.call(b, bind(DC, 4));
    assert_eq!(s.take_others().len(), 2);
    s.core(1).on_register_result(a.conn, Ok(()));
    // The directory lets the second through: its key names this node.
    s.core(1).on_register_result(b.conn, Ok(()));
    s.pump();
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 4,
            node: 1,
        },
    );
    s.expect_err(b, Errno::AlreadyBound);
    assert_eq!(
        s.core(1).registrations(),
        vec![(DC, 4, Registration::Local { conn: a.conn })]
    );
    // A stray answer for a connection that is not binding is ignored.
    s.core(1).on_register_result(b.conn, Ok(()));
    s.core(1).on_register_result(a.conn, Err(Errno::Permission));
    s.pump();
    s.idle(a);
    s.idle(b);
}

#[test]
fn disconnect_while_binding_unregisters_and_ignores_the_late_answer() {
    let mut s = Sim::new();
    s.manual_register = true;
    let a = s.connect(1);
    s.call(a, bind(DC, 4));
    // A request while the bind is in progress breaks the protocol.
    s.call(a, LocalRequest::GetEp);
    let others = s.take_others();
    assert_eq!(others.len(), 2);
    assert!(
        matches!(others[1], (1, Action::Local(LocalAction::Close { conn, .. })) if conn == a.conn)
    );
    s.disconnect(a);
    assert_eq!(
        s.take_others(),
        vec![(
            1,
            Action::Directory(DirRequest::Unregister { dc: DC, ep: 4 })
        )]
    );
    s.core(1).on_register_result(a.conn, Ok(()));
    s.pump();
    s.idle(a);
    assert!(s.core(1).registrations().is_empty());
}

#[test]
fn unbind_releases_the_endpoint() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 3);
    let b = s.bind(1, DC, 4);
    s.call(b, send(3, 1, FOREVER));
    s.idle(b);
    s.take_frames();
    s.take_others();
    s.call(a, LocalRequest::Unbind);
    s.expect_done(a);
    s.expect_err(b, Errno::DstDied);
    assert_eq!(
        s.take_others(),
        vec![(
            1,
            Action::Directory(DirRequest::Unregister { dc: DC, ep: 3 })
        )]
    );
    assert_eq!(
        s.take_frames(),
        vec![
            (
                1,
                2,
                PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 3 }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 3 }))
            )
        ]
    );
    assert!(!s.dir.contains_key(&(DC, 3)));
    for n in [2, 3] {
        assert!(s.core(n).registrations().iter().all(|(_, ep, _)| *ep != 3));
    }
    s.call(a, LocalRequest::GetEp);
    s.expect_err(a, Errno::NotBound);
    s.call(a, LocalRequest::Unbind);
    s.expect_err(a, Errno::NotBound);
    // Unbound but connected: it can bind again, even another endpoint.
    s.call(a, bind(DC, 5));
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 5,
            node: 1,
        },
    );
}

#[test]
fn every_call_on_an_unbound_connection_is_not_bound() {
    let mut s = Sim::new();
    s.bind(1, DC, 1);
    let u = s.connect(1);
    let calls = [
        LocalRequest::Unbind,
        LocalRequest::GetEp,
        send(1, 1, FOREVER),
        any(),
        sendrec(1, 1, FOREVER),
        reply(1, 1),
        notify(1, 1),
        vcopy(1, 1, 10, FOREVER),
        wait_bind(1, FOREVER),
    ];
    for req in calls {
        s.call(u, req.clone());
        assert_eq!(
            s.resp(u),
            Some(LocalResponse::Err(Errno::NotBound)),
            "{req:?}"
        );
    }
    assert!(s.take_others().is_empty());
}

#[test]
fn registration_helpers() {
    assert_eq!(Registration::Local { conn: 7 }.node(4), 4);
    assert_eq!(Registration::Remote { node: 2 }.node(4), 2);
    assert_eq!(Registration::Backup { node: 3 }.node(4), 3);
    assert_eq!(
        Registration::Local { conn: 7 }.kind(),
        RegistrationKind::Running
    );
    assert_eq!(
        Registration::Remote { node: 2 }.kind(),
        RegistrationKind::Remote(2)
    );
    assert_eq!(
        Registration::Backup { node: 3 }.kind(),
        RegistrationKind::Backup(3)
    );
}

// ----- local send / receive ----------------------------------------------------------------

#[test]
fn send_then_receive_is_a_rendezvous() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.take_frames();
    let mut m = msg(7);
    m.source = 99; // forged: the kernel fills in the real source
    m.set_word(3, 0xdead_beef);
    s.call(
        a,
        LocalRequest::Send {
            dst: 2,
            msg: m,
            timeout: FOREVER,
        },
    );
    s.idle(a);
    s.call(b, any());
    let got = s.expect_msg_from(b, 1, 7);
    assert_eq!(got.word(3), 0xdead_beef);
    s.expect_done(a);
    // Nothing left over.
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    assert!(s.take_frames().is_empty(), "local traffic stays local");
}

#[test]
fn receive_then_send_completes_both_at_once() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(b, any());
    s.idle(b);
    s.call(a, send(2, 8, FOREVER));
    s.expect_msg_from(b, 1, 8);
    s.expect_done(a);
}

#[test]
fn receive_from_a_specific_source_skips_others_and_keeps_order() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    let c = s.bind(1, DC, 3);
    let d = s.bind(1, DC, 4);
    s.call(a, send(4, 10, FOREVER));
    s.call(b, send(4, 20, FOREVER));
    s.call(c, send(4, 30, FOREVER));
    s.call(d, from(3));
    s.expect_msg_from(d, 3, 30);
    s.expect_done(c);
    s.idle(a);
    s.idle(b);
    // The rest in arrival order.
    s.call(d, any());
    s.expect_msg_from(d, 1, 10);
    s.expect_done(a);
    s.call(c, send(4, 31, FOREVER));
    s.call(d, any());
    s.expect_msg_from(d, 2, 20);
    s.call(d, any());
    s.expect_msg_from(d, 3, 31);
    s.expect_done(b);
    s.expect_done(c);
    // A receiver waiting for one source is not woken by another.
    s.call(d, from(1));
    s.call(b, send(4, 21, FOREVER));
    s.idle(d);
    s.idle(b);
    s.call(a, send(4, 11, FOREVER));
    s.expect_msg_from(d, 1, 11);
    s.expect_done(a);
    s.call(d, from(2));
    s.expect_msg_from(d, 2, 21);
    s.expect_done(b);
}

#[test]
fn send_errors() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    s.call(a, send(1, 1, FOREVER));
    s.expect_err(a, Errno::SelfSend);
    s.call(a, sendrec(1, 1, FOREVER));
    s.expect_err(a, Errno::SelfSend);
    s.call(a, send(MAX_EP as Ep, 1, FOREVER));
    s.expect_err(a, Errno::BadEndpoint);
    s.call(a, sendrec(-3, 1, FOREVER));
    s.expect_err(a, Errno::BadEndpoint);
    s.call(a, send(9, 1, FOREVER));
    s.expect_err(a, Errno::NoSuchEndpoint);
}

#[test]
fn deadlock_between_two_senders() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, send(2, 1, FOREVER));
    s.call(b, send(1, 2, FOREVER));
    s.expect_err(b, Errno::Deadlock);
    s.call(b, sendrec(1, 2, FOREVER));
    s.expect_err(b, Errno::Deadlock);
    s.idle(a);
    // a's send is still pending and completes normally.
    s.call(b, any());
    s.expect_msg_from(b, 1, 1);
    s.expect_done(a);
    // Also when the first one is a sendrec still queued.
    s.call(a, sendrec(2, 3, FOREVER));
    s.call(b, send(1, 4, FOREVER));
    s.expect_err(b, Errno::Deadlock);
}

#[test]
fn queue_full_local_and_remote() {
    let mut s = Sim::new();
    let d = s.bind(1, DC2, 0);
    let a = s.bind(1, DC2, 1);
    let b = s.bind(1, DC2, 2);
    let c = s.bind(1, DC2, 3);
    let e = s.bind(2, DC2, 4);
    s.call(a, send(0, 1, FOREVER));
    s.call(b, send(0, 2, FOREVER));
    s.call(c, send(0, 3, FOREVER));
    s.expect_err(c, Errno::QueueFull);
    s.call(e, send(0, 4, FOREVER));
    s.expect_err(e, Errno::QueueFull);
    s.call(d, any());
    s.expect_msg_from(d, 1, 1);
    s.expect_done(a);
    // Room again.
    s.call(e, send(0, 4, FOREVER));
    s.idle(e);
    s.call(d, any());
    s.expect_msg_from(d, 2, 2);
    s.call(d, any());
    s.expect_msg_from(d, 4, 4);
    s.expect_done(e);
}

#[test]
fn a_launched_process_binds_only_its_own_endpoint() {
    let mut s = Sim::new();
    let a = s.connect_as(1, 0, Some((DC, 1)));
    // Root, but launched for DC/1: another endpoint is refused, its own is not.
    s.call(a, bind(DC, 2));
    s.expect_err(a, Errno::Permission);
    s.call(a, bind(DC2, 1));
    s.expect_err(a, Errno::Permission);
    assert!(s.dir.is_empty() && s.take_frames().is_empty());
    s.call(a, bind(DC, 1));
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC,
            ep: 1,
            node: 1,
        },
    );
    // A launched non-root process may bind its own endpoint too.
    let b = s.connect_as(1, 1000, Some((DC, 3)));
    s.call(b, bind(DC, 3));
    s.expect(
        b,
        LocalResponse::Ep {
            dc: DC,
            ep: 3,
            node: 1,
        },
    );
}

#[test]
fn an_unlaunched_process_binds_only_with_a_listed_uid() {
    let mut s = Sim::new();
    // DC allows root only; DC2 allows root and 1000.
    let a = s.connect_as(1, 1000, None);
    s.call(a, bind(DC, 1));
    s.expect_err(a, Errno::Permission);
    assert!(s.dir.is_empty() && s.core(1).registrations().is_empty());
    s.call(a, bind(DC2, 1));
    s.expect(
        a,
        LocalResponse::Ep {
            dc: DC2,
            ep: 1,
            node: 1,
        },
    );
    let b = s.connect_as(1, 65534, None);
    s.call(b, bind(DC2, 2));
    s.expect_err(b, Errno::Permission);
    // A refused process cannot restore-bind its way in either.
    s.call(
        b,
        LocalRequest::BindRestored {
            version: PROTOCOL_VERSION,
            dc: DC,
            ep: 5,
            migration: 1,
        },
    );
    s.expect_err(b, Errno::Permission);
}

#[test]
fn request_while_blocked_closes_the_connection() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, any());
    s.call(a, send(2, 1, FOREVER));
    let others = s.take_others();
    assert!(
        matches!(&others[..], [(1, Action::Local(LocalAction::Close { conn, .. }))] if *conn == a.conn),
        "{others:?}"
    );
    s.idle(a);
    // The call in progress is untouched.
    s.call(b, send(1, 5, FOREVER));
    s.expect_msg_from(a, 2, 5);
    s.expect_done(b);
    s.idle(a);
}

// ----- sendrec / reply ---------------------------------------------------------------------

#[test]
fn sendrec_and_reply_local() {
    let mut s = Sim::new();
    let c = s.bind(1, DC, 1);
    let srv = s.bind(1, DC, 2);
    // Server first.
    s.call(srv, any());
    s.call(c, sendrec(2, 10, FOREVER));
    s.expect_msg_from(srv, 1, 10);
    s.idle(c);
    s.call(srv, reply(1, 11));
    s.expect_done(srv);
    s.expect_msg_from(c, 2, 11);
    // Client first.
    s.call(c, sendrec(2, 12, FOREVER));
    s.idle(c);
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 12);
    s.idle(c);
    // The client waits for the reply, not for any message of the server.
    let o = s.bind(1, DC, 3);
    s.call(o, notify(1, 1));
    s.expect_done(o);
    s.idle(c);
    s.call(srv, reply(1, 13));
    s.expect_done(srv);
    s.expect_msg_from(c, 2, 13);
    // Its notification is still pending.
    s.call(c, recv(Source::Any, NOWAIT));
    s.expect_msg_from(c, 3, NOTIFY_MTYPE);
}

#[test]
fn reply_to_an_endpoint_not_waiting() {
    let mut s = Sim::new();
    let c = s.bind(1, DC, 1);
    let srv = s.bind(1, DC, 2);
    s.call(srv, reply(1, 1));
    s.expect_err(srv, Errno::NotWaiting);
    s.call(srv, reply(9, 1));
    s.expect_err(srv, Errno::NotWaiting);
    // A plain send taken by the server is not owed a reply.
    s.call(c, send(2, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg(srv);
    s.expect_done(c);
    s.call(srv, reply(1, 1));
    s.expect_err(srv, Errno::NotWaiting);
    // One reply per request.
    s.call(c, sendrec(2, 2, FOREVER));
    s.call(srv, any());
    s.expect_msg(srv);
    s.call(srv, reply(1, 3));
    s.expect_done(srv);
    s.expect_msg_from(c, 2, 3);
    s.call(srv, reply(1, 4));
    s.expect_err(srv, Errno::NotWaiting);
    s.idle(c);
}

// ----- notify ------------------------------------------------------------------------------

#[test]
fn notify_never_blocks_and_coalesces() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    let c = s.bind(1, DC, 3);
    s.call(a, notify(2, 1));
    s.expect_done(a);
    s.call(a, notify(2, 4));
    s.expect_done(a);
    s.call(c, notify(2, 8));
    s.expect_done(c);
    s.call(b, any());
    let m = s.expect_msg_from(b, 1, NOTIFY_MTYPE);
    assert_eq!(m.word(0), 5, "values are OR'ed");
    s.call(b, any());
    let m = s.expect_msg_from(b, 3, NOTIFY_MTYPE);
    assert_eq!(m.word(0), 8);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
}

#[test]
fn pending_notifications_come_before_queued_messages() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    let d = s.bind(1, DC, 4);
    s.call(d, send(2, 40, FOREVER));
    s.call(a, notify(2, 2));
    s.expect_done(a);
    s.call(b, any());
    assert_eq!(s.expect_msg_from(b, 1, NOTIFY_MTYPE).word(0), 2);
    s.idle(d);
    s.call(b, any());
    s.expect_msg_from(b, 4, 40);
    s.expect_done(d);
    // Receiving from a specific source leaves other sources' notifications pending.
    s.call(d, send(2, 41, FOREVER));
    s.call(a, notify(2, 3));
    s.call(b, from(4));
    s.expect_msg_from(b, 4, 41);
    s.call(b, from(1));
    assert_eq!(s.expect_msg_from(b, 1, NOTIFY_MTYPE).word(0), 3);
}

#[test]
fn notify_to_a_receiving_endpoint_is_delivered_at_once() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    let c = s.bind(1, DC, 3);
    s.call(b, any());
    s.call(a, notify(2, 6));
    s.expect_done(a);
    assert_eq!(s.expect_msg_from(b, 1, NOTIFY_MTYPE).word(0), 6);
    // A receiver waiting for someone else keeps it pending.
    s.call(b, from(3));
    s.call(a, notify(2, 1));
    s.expect_done(a);
    s.idle(b);
    s.call(c, send(2, 30, FOREVER));
    s.expect_msg_from(b, 3, 30);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_msg_from(b, 1, NOTIFY_MTYPE);
}

#[test]
fn notify_errors() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    s.bind(1, DC2, 7);
    s.call(a, notify(1, 1));
    s.expect_err(a, Errno::SelfSend);
    s.call(a, notify(MAX_EP as Ep, 1));
    s.expect_err(a, Errno::BadEndpoint);
    s.call(a, notify(9, 1));
    s.expect_err(a, Errno::NoSuchEndpoint);
    s.call(a, notify(7, 1));
    s.expect_err(a, Errno::OtherDc);
}

#[test]
fn remote_notify() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    s.take_frames();
    s.call(a, notify(2, 3));
    s.expect_done(a);
    assert_eq!(
        s.take_frames(),
        vec![(
            1,
            2,
            PeerFrame::Ipc(IpcFrame::Notify(Notify {
                dc: DC,
                src: 1,
                dst: 2,
                value: 3
            }))
        )]
    );
    s.call(a, notify(2, 4));
    s.call(b, any());
    assert_eq!(s.expect_msg_from(b, 1, NOTIFY_MTYPE).word(0), 7);
    s.call(b, any());
    s.call(a, notify(2, 8));
    assert_eq!(s.expect_msg_from(b, 1, NOTIFY_MTYPE).word(0), 8);
}

// ----- timeouts ----------------------------------------------------------------------------

#[test]
fn send_timeouts() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, send(2, 1, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    assert_eq!(s.core(1).poll_timeout(), None);
    s.call(a, send(2, 2, Timeout::Millis(50)));
    assert_eq!(
        s.core(1).poll_timeout(),
        Some(s.now + Duration::from_millis(50))
    );
    s.advance(49);
    s.idle(a);
    s.advance(1);
    s.expect_err(a, Errno::TimedOut);
    // The timed-out message is gone.
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // A send taken in time is not failed later by its stale timer.
    s.call(a, send(2, 3, Timeout::Millis(50)));
    s.advance(10);
    s.call(b, any());
    s.expect_msg_from(b, 1, 3);
    s.expect_done(a);
    s.call(a, send(2, 4, FOREVER));
    s.advance(100);
    s.idle(a);
    s.call(b, any());
    s.expect_msg_from(b, 1, 4);
    s.expect_done(a);
}

#[test]
fn receive_timeouts() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    s.call(b, recv(Source::Ep(1), Timeout::Millis(10)));
    s.advance(9);
    s.idle(b);
    s.advance(1);
    s.expect_err(b, Errno::TimedOut);
    // It is no longer receiving.
    s.call(a, send(2, 1, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    s.call(b, recv(Source::Any, Timeout::Millis(10)));
    s.call(a, send(2, 2, NOWAIT));
    s.expect_msg_from(b, 1, 2);
    s.expect_done(a);
    s.advance(20);
    s.idle(b);
}

#[test]
fn sendrec_timeouts() {
    let mut s = Sim::new();
    let c = s.bind(1, DC, 1);
    let srv = s.bind(1, DC, 2);
    s.call(c, sendrec(2, 1, NOWAIT));
    s.expect_err(c, Errno::TimedOut);
    // Still queued when the time is up.
    s.call(c, sendrec(2, 2, Timeout::Millis(30)));
    s.advance(30);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, recv(Source::Any, NOWAIT));
    s.expect_err(srv, Errno::TimedOut);
    // Taken, but no reply in time: the deadline covers the whole call.
    s.call(c, sendrec(2, 3, Timeout::Millis(30)));
    s.advance(10);
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 3);
    s.advance(19);
    s.idle(c);
    s.advance(1);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, reply(1, 4));
    s.expect_err(srv, Errno::NotWaiting);
    // Taken at once by a waiting server, no reply in time.
    s.call(srv, any());
    s.call(c, sendrec(2, 5, Timeout::Millis(30)));
    s.expect_msg_from(srv, 1, 5);
    s.advance(29);
    s.idle(c);
    s.advance(1);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, reply(1, 6));
    s.expect_err(srv, Errno::NotWaiting);
    // Replied in time: the stale timer does nothing.
    s.call(srv, any());
    s.call(c, sendrec(2, 7, Timeout::Millis(30)));
    s.expect_msg(srv);
    s.call(srv, reply(1, 8));
    s.expect_done(srv);
    s.expect_msg_from(c, 2, 8);
    s.advance(100);
    s.idle(c);
}

#[test]
fn wait_for_bind_timeouts() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    s.bind(2, DC, 2);
    s.call(a, wait_bind(2, NOWAIT));
    s.expect_done(a);
    s.call(a, wait_bind(1, NOWAIT));
    s.expect_done(a);
    s.call(a, wait_bind(5, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    s.call(a, wait_bind(5, Timeout::Millis(20)));
    s.advance(19);
    s.idle(a);
    s.advance(1);
    s.expect_err(a, Errno::TimedOut);
    s.bind(3, DC, 5);
    s.idle(a);
    s.call(a, wait_bind(MAX_EP as Ep, FOREVER));
    s.expect_err(a, Errno::BadEndpoint);
}

#[test]
fn vcopy_timeouts() {
    let mut s = Sim::new();
    let srv = s.bind(1, DC, 1);
    let c = s.bind(1, DC, 2);
    s.call(c, sendrec(1, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg(srv);
    s.call(srv, vcopy(2, 1, 100, Timeout::Millis(20)));
    let others = s.take_others();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.advance(19);
    s.idle(srv);
    s.advance(1);
    s.expect_err(srv, Errno::TimedOut);
    // The copy finishing late does not answer twice.
    s.core(1).on_vcopy_local_done(done, Ok(()));
    s.pump();
    s.idle(srv);
    // NoWait: only what completes before timers run.
    s.call(srv, vcopy(2, 1, 100, NOWAIT));
    let others = s.take_others();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.advance(0);
    s.expect_err(srv, Errno::TimedOut);
    s.core(1).on_vcopy_local_done(done, Ok(()));
    s.pump();
    s.idle(srv);
    s.call(srv, vcopy(2, 1, 100, NOWAIT));
    let others = s.take_others();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.core(1).on_vcopy_local_done(done, Ok(()));
    s.pump();
    s.expect_done(srv);
    s.advance(0);
    s.idle(srv);
    s.idle(c);
}

// ----- remote send / sendrec ---------------------------------------------------------------

#[test]
fn remote_send_completes_only_when_taken() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    s.take_frames();
    s.call(a, send(2, 7, FOREVER));
    s.idle(a);
    let frames = s.take_frames();
    let [(
        1,
        2,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op,
            dc: DC,
            src: 1,
            dst: 2,
            kind: DeliverKind::Send,
            msg: m,
            timeout: FOREVER,
        })),
    )] = frames[..]
    else {
        panic!("{frames:?}")
    };
    assert_eq!(m.mtype, 7);
    s.call(b, any());
    s.expect_msg_from(b, 1, 7);
    assert_eq!(
        s.take_frames(),
        vec![(
            2,
            1,
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Ok(()) }))
        )]
    );
    s.expect_done(a);
    // A Delivered for an unknown or stale op changes nothing.
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Ok(()) })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
            op: 999,
            result: Err(Errno::DstDied),
        })),
    );
    s.idle(a);
}

#[test]
fn remote_delivery_to_a_waiting_receiver() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    s.call(b, from(1));
    s.call(a, send(2, 9, FOREVER));
    s.expect_msg_from(b, 1, 9);
    s.expect_done(a);
    // Remote NoWait: the destination node decides at once.
    s.call(a, send(2, 10, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    s.call(b, any());
    s.call(a, send(2, 11, NOWAIT));
    s.expect_msg_from(b, 1, 11);
    s.expect_done(a);
}

#[test]
fn remote_send_timeouts() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    // The destination node times the queued message out and says so.
    s.call(a, send(2, 1, Timeout::Millis(50)));
    s.advance(49);
    s.idle(a);
    s.advance(1);
    s.expect_err(a, Errno::TimedOut);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // Its verdict is lost: the sender gives up after a grace period and cancels.
    s.auto_route = false;
    s.call(a, send(2, 2, Timeout::Millis(50)));
    s.advance(249);
    s.idle(a);
    s.take_frames();
    s.advance(1);
    s.expect_err(a, Errno::TimedOut);
    let frames = s.take_frames();
    assert!(
        matches!(
            &frames[..],
            [(1, 2, PeerFrame::Ipc(IpcFrame::Cancel(Cancel { .. })))]
        ),
        "{frames:?}"
    );
    // The Deliver and the Cancel reach node 2 in that order: nothing is left queued.
    s.auto_route = true;
    s.deliver_all();
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    s.idle(a);
}

#[test]
fn cancel_drops_a_queued_remote_message() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    s.take_frames();
    s.call(a, send(2, 1, FOREVER));
    let frames = s.take_frames();
    let [(1, 2, PeerFrame::Ipc(IpcFrame::Deliver(Deliver { op, .. })))] = frames[..] else {
        panic!("{frames:?}")
    };
    s.inject(1, 2, PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })));
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // Every Cancel is acknowledged (here the sender had not given up: it learns the outcome).
    assert_eq!(
        s.take_frames(),
        vec![(
            2,
            1,
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                op,
                result: Err(Errno::TimedOut)
            }))
        )]
    );
    s.expect_err(a, Errno::TimedOut);
    s.call(a, send(2, 1, FOREVER));
    // A Cancel from another node with the same op number is not this message.
    s.disconnect(a);
    let a = s.bind(1, DC, 1);
    s.call(a, send(2, 2, FOREVER));
    let frames = s.take_frames();
    let [.., (1, 2, PeerFrame::Ipc(IpcFrame::Deliver(Deliver { op, .. })))] = frames[..] else {
        panic!("{frames:?}")
    };
    s.inject(3, 2, PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op })));
    s.call(b, any());
    s.expect_msg_from(b, 1, 2);
    s.expect_done(a);
    // The sender going away cancels too.
    s.call(a, send(2, 3, FOREVER));
    s.take_frames();
    s.disconnect(a);
    let frames = s.take_frames();
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, (1, 2, PeerFrame::Ipc(IpcFrame::Cancel(Cancel { .. }))))),
        "{frames:?}"
    );
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
}

#[test]
fn remote_sendrec_across_three_nodes() {
    let mut s = Sim::new();
    let c1 = s.bind(1, DC, 1);
    let srv = s.bind(2, DC, 2);
    let c3 = s.bind(3, DC, 3);
    s.take_frames();
    s.call(srv, any());
    s.call(c1, sendrec(2, 100, FOREVER));
    s.expect_msg_from(srv, 1, 100);
    s.idle(c1);
    s.call(srv, reply(1, 101));
    s.expect_done(srv);
    s.expect_msg_from(c1, 2, 101);
    let frames = s.take_frames();
    assert!(
        matches!(
            &frames[..],
            [
                (
                    1,
                    2,
                    PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
                        kind: DeliverKind::SendRec,
                        ..
                    }))
                ),
                (
                    2,
                    1,
                    PeerFrame::Ipc(IpcFrame::Reply(Reply {
                        dc: DC,
                        src: 2,
                        dst: 1,
                        result: Ok(_)
                    }))
                ),
            ]
        ),
        "{frames:?}"
    );
    // Two clients queued, answered in the other order.
    s.call(c3, sendrec(2, 300, FOREVER));
    s.call(c1, sendrec(2, 102, FOREVER));
    s.call(srv, any());
    s.expect_msg_from(srv, 3, 300);
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 102);
    s.idle(c1);
    s.idle(c3);
    s.call(srv, reply(1, 103));
    s.expect_done(srv);
    s.expect_msg_from(c1, 2, 103);
    s.idle(c3);
    s.call(srv, reply(3, 301));
    s.expect_done(srv);
    s.expect_msg_from(c3, 2, 301);
    let replies: Vec<_> = s
        .take_frames()
        .into_iter()
        .filter(|f| matches!(f.2, PeerFrame::Ipc(IpcFrame::Reply(Reply { .. }))))
        .map(|f| (f.0, f.1))
        .collect();
    assert_eq!(replies, vec![(2, 1), (2, 3)]);
    // Reply once only.
    s.call(srv, reply(3, 302));
    s.expect_err(srv, Errno::NotWaiting);
    // A Reply frame for a client not waiting is dropped.
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Reply(Reply {
            dc: DC,
            src: 2,
            dst: 1,
            result: Ok(msg(5)),
        })),
    );
    s.idle(c1);
    // Remote sendrec with a Millis timeout the server does not meet.
    s.call(c1, sendrec(2, 104, Timeout::Millis(40)));
    s.call(srv, any());
    s.expect_msg(srv);
    s.advance(1000);
    s.expect_err(c1, Errno::TimedOut);
}

#[test]
fn late_reply_to_an_abandoned_sendrec_is_not_taken_for_the_next_one() {
    let mut s = Sim::new();
    let c = s.bind(1, DC, 1);
    let srv = s.bind(2, DC, 2);
    s.auto_route = false;
    s.call(srv, any());
    s.call(c, sendrec(2, 10, Timeout::Millis(10)));
    s.deliver_all();
    s.expect_msg_from(srv, 1, 10);
    // The server replies, but the client gives up before the reply arrives and asks again.
    s.call(srv, reply(1, 11));
    s.expect_done(srv);
    s.advance(1000);
    s.expect_err(c, Errno::TimedOut);
    s.call(c, sendrec(2, 12, FOREVER));
    s.deliver_all();
    s.idle(c);
    s.call(srv, any());
    s.deliver_all();
    s.expect_msg_from(srv, 1, 12);
    s.call(srv, reply(1, 13));
    s.expect_done(srv);
    s.deliver_all();
    s.expect_msg_from(c, 2, 13);
    // A server that has not replied yet when the Cancel arrives is no longer waited for, as
    // with a local client that timed out; the next sendrec of the pair works as usual.
    s.auto_route = true;
    s.call(c, sendrec(2, 14, Timeout::Millis(10)));
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 14);
    s.advance(1000);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, reply(1, 15));
    s.expect_err(srv, Errno::NotWaiting);
    s.idle(c);
    s.call(c, sendrec(2, 16, FOREVER));
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 16);
    s.call(srv, reply(1, 17));
    s.expect_msg_from(c, 2, 17);
}

#[test]
fn remote_deliver_errors() {
    let mut s = Sim::new();
    let b = s.bind(1, DC, 2);
    s.take_frames();
    // Node 3 is not part of DC2.
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 70,
            dc: DC2,
            src: 1,
            dst: 2,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: FOREVER,
        })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 71,
            dc: DC,
            src: 1,
            dst: 5,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: FOREVER,
        })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 72,
            dc: DC,
            src: 1,
            dst: MAX_EP as Ep,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: FOREVER,
        })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 73,
            dc: NO_DC,
            src: 1,
            dst: 2,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: FOREVER,
        })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 74,
            dc: DC,
            src: 1,
            dst: 2,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: NOWAIT,
        })),
    );
    let verdicts = s.take_frames();
    assert_eq!(
        verdicts,
        vec![
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    op: 70,
                    result: Err(Errno::NodeNotInDc)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    op: 71,
                    result: Err(Errno::DstDied)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    op: 72,
                    result: Err(Errno::BadEndpoint)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    op: 73,
                    result: Err(Errno::NodeNotInDc)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    op: 74,
                    result: Err(Errno::TimedOut)
                }))
            ),
        ]
    );
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
}

#[test]
fn unknown_remote_sender_is_registered_at_its_node() {
    let mut s = Sim::new();
    let b = s.bind(1, DC, 2);
    assert!(s.core(1).registrations().iter().all(|(_, ep, _)| *ep != 9));
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
            op: 5,
            dc: DC,
            src: 9,
            dst: 2,
            kind: DeliverKind::Send,
            msg: msg(1),
            timeout: FOREVER,
        })),
    );
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 9, Registration::Remote { node: 3 })));
    s.call(b, any());
    s.expect_msg_from(b, 9, 1);
    assert_eq!(
        s.take_frames().last(),
        Some(&(
            1,
            3,
            PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                op: 5,
                result: Ok(())
            }))
        ))
    );
    // It can be answered without asking the directory.
    s.manual_lookup = true;
    s.call(b, send(9, 2, FOREVER));
    assert!(s.take_others().is_empty());
    let frames = s.take_frames();
    assert!(
        matches!(
            &frames[..],
            [
                (
                    1,
                    3,
                    PeerFrame::Ipc(IpcFrame::Deliver(Deliver { dst: 9, .. }))
                ),
                (
                    3,
                    1,
                    PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                        result: Err(Errno::DstDied),
                        ..
                    }))
                )
            ]
        ),
        "{frames:?}"
    );
    s.expect_err(b, Errno::DstDied);
    // A notification registers too; a migrated sender moves (node 3 migrates it to node 2).
    s.inject(
        3,
        1,
        PeerFrame::Migr(MigrFrame::Start(MigrStart {
            id: (3 << 48) | 1,
            dc: DC,
            ep: 9,
            from: 3,
            to: 2,
        })),
    );
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Notify(Notify {
            dc: DC,
            src: 10,
            dst: 2,
            value: 1,
        })),
    );
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Notify(Notify {
            dc: DC,
            src: 9,
            dst: 2,
            value: 1,
        })),
    );
    let regs = s.core(1).registrations();
    assert!(
        regs.contains(&(DC, 10, Registration::Remote { node: 2 })),
        "{regs:?}"
    );
    assert!(
        regs.contains(&(DC, 9, Registration::Remote { node: 2 })),
        "{regs:?}"
    );
    // A peer claiming a local endpoint does not take it over.
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Notify(Notify {
            dc: DC,
            src: 2,
            dst: 2,
            value: 1,
        })),
    );
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 2, Registration::Local { conn: b.conn })));
    // Nor does a node outside the DC register anything.
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Notify(Notify {
            dc: DC2,
            src: 11,
            dst: 2,
            value: 1,
        })),
    );
    assert!(s.core(1).registrations().iter().all(|(_, ep, _)| *ep != 11));
}

// ----- links -------------------------------------------------------------------------------

#[test]
fn link_down_fails_remote_callers_and_new_sends() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    let c = s.bind(1, DC, 3);
    let d = s.bind(2, DC, 4);
    let x = s.bind(3, DC, 5);
    s.call(a, send(2, 1, FOREVER));
    s.call(c, sendrec(2, 3, FOREVER));
    s.call(b, from(3));
    s.expect_msg_from(b, 3, 3);
    assert!(s.core(1).link_up(2));
    s.link_down(1, 2);
    assert!(!s.core(1).link_up(2) && !s.core(2).link_up(1));
    s.expect_err(a, Errno::NodeUnreachable);
    s.expect_err(c, Errno::NodeUnreachable);
    // Node 2 forgot what node 1's processes had queued or are owed.
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    s.call(b, reply(3, 4));
    s.expect_err(b, Errno::NotWaiting);
    // New calls fail at once.
    s.call(a, send(2, 5, FOREVER));
    s.expect_err(a, Errno::NodeUnreachable);
    s.call(a, sendrec(4, 5, FOREVER));
    s.expect_err(a, Errno::NodeUnreachable);
    s.call(a, notify(2, 1));
    s.expect_err(a, Errno::NodeUnreachable);
    s.call(b, notify(1, 1));
    s.expect_err(b, Errno::NodeUnreachable);
    // Other links work.
    s.call(b, any());
    s.call(x, send(2, 6, FOREVER));
    s.expect_msg_from(b, 5, 6);
    s.expect_done(x);
    s.call(d, any());
    s.call(x, send(4, 7, FOREVER));
    s.expect_msg_from(d, 5, 7);
    // A second "down" is harmless.
    s.core(1).on_link_down(2);
    s.pump();
    // Back up: each side re-announces its endpoints.
    s.take_frames();
    s.link_up(1, 2);
    let mut bound = s.take_frames();
    bound.sort_by_key(|(f, _, fr)| (*f, format!("{fr:?}")));
    assert_eq!(
        bound,
        vec![
            (
                1,
                2,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 1 }))
            ),
            (
                1,
                2,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 3 }))
            ),
            (
                2,
                1,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 2 }))
            ),
            (
                2,
                1,
                PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 4 }))
            ),
        ]
    );
    s.call(b, any());
    s.call(a, send(2, 8, FOREVER));
    s.expect_msg_from(b, 1, 8);
    s.expect_done(a);
}

#[test]
fn link_down_fails_only_the_vcopies_that_need_that_node() {
    let mut s = Sim::new();
    let srv = s.bind(1, DC, 1);
    let c = s.bind(1, DC, 2);
    let r = s.bind(2, DC, 3);
    let srv3 = s.bind(3, DC, 4);
    s.call(c, sendrec(1, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg(srv);
    s.call(r, sendrec(4, 1, FOREVER));
    s.call(srv3, any());
    s.expect_msg(srv3);
    // A purely local copy on node 1, and one on node 3 pulling from node 2.
    s.call(srv, vcopy(2, 1, 100, FOREVER));
    let others = s.take_others();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.auto_route = false;
    s.call(srv3, vcopy(3, 4, 100, FOREVER));
    s.link_down(1, 2);
    s.idle(srv);
    s.idle(srv3);
    s.core(1).on_vcopy_local_done(done, Ok(()));
    s.pump();
    s.expect_done(srv);
    s.link_down(2, 3);
    s.expect_err(srv3, Errno::NodeUnreachable);
}

// ----- process death -----------------------------------------------------------------------

#[test]
fn local_process_death_fails_everyone_waiting_on_it() {
    let mut s = Sim::new();
    let srv = s.bind(1, DC, 2);
    let a = s.bind(1, DC, 1);
    let c = s.bind(1, DC, 3);
    let d = s.bind(1, DC, 4);
    let r = s.bind(1, DC, 5);
    let o = s.bind(1, DC, 6);
    // d's sendrec is taken; a's send and c's sendrec wait in the queue; r waits for srv.
    s.call(d, sendrec(2, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg_from(srv, 4, 1);
    s.call(a, send(2, 2, FOREVER));
    s.call(c, sendrec(2, 3, FOREVER));
    s.call(r, from(2));
    s.call(o, any());
    s.take_frames();
    s.take_others();
    s.disconnect(srv);
    s.expect_err(a, Errno::DstDied);
    s.expect_err(c, Errno::DstDied);
    s.expect_err(d, Errno::DstDied);
    s.expect_err(r, Errno::SrcDied);
    s.idle(o);
    s.idle(srv);
    assert_eq!(
        s.take_others(),
        vec![(
            1,
            Action::Directory(DirRequest::Unregister { dc: DC, ep: 2 })
        )]
    );
    assert_eq!(
        s.take_frames(),
        vec![
            (
                1,
                2,
                PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 2 }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 2 }))
            )
        ]
    );
    assert!(!s.dir.contains_key(&(DC, 2)));
    for n in NODES {
        assert!(
            s.core(n).registrations().iter().all(|(_, ep, _)| *ep != 2),
            "node {n}"
        );
    }
    // Unknown now.
    s.call(a, send(2, 4, FOREVER));
    s.expect_err(a, Errno::NoSuchEndpoint);
    // A new process may take the endpoint.
    s.bind(3, DC, 2);
}

#[test]
fn remote_process_death_fails_everyone_waiting_on_it() {
    let mut s = Sim::new();
    let srv = s.bind(2, DC, 2);
    let a = s.bind(1, DC, 1);
    let c = s.bind(3, DC, 3);
    let r1 = s.bind(1, DC, 5);
    let r3 = s.bind(3, DC, 6);
    let l = s.bind(2, DC, 4);
    s.call(c, sendrec(2, 3, FOREVER));
    s.call(srv, from(3));
    s.expect_msg_from(srv, 3, 3);
    s.call(a, send(2, 1, FOREVER));
    s.call(r1, from(2));
    s.call(r3, from(2));
    s.call(l, from(2));
    s.take_frames();
    s.disconnect(srv);
    s.expect_err(a, Errno::DstDied);
    s.expect_err(c, Errno::DstDied);
    s.expect_err(r1, Errno::SrcDied);
    s.expect_err(r3, Errno::SrcDied);
    s.expect_err(l, Errno::SrcDied);
    let frames = s.take_frames();
    assert!(
        frames.contains(&(
            2,
            3,
            PeerFrame::Ipc(IpcFrame::Reply(Reply {
                dc: DC,
                src: 2,
                dst: 3,
                result: Err(Errno::DstDied)
            }))
        )),
        "{frames:?}"
    );
    assert!(
        frames.iter().any(|f| matches!(
            f,
            (
                2,
                1,
                PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                    result: Err(Errno::DstDied),
                    ..
                }))
            )
        )),
        "{frames:?}"
    );
    for n in NODES {
        assert!(
            s.core(n).registrations().iter().all(|(_, ep, _)| *ep != 2),
            "node {n}"
        );
    }
}

#[test]
fn death_of_a_sender_or_client() {
    let mut s = Sim::new();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    let c = s.bind(1, DC, 3);
    let r = s.bind(2, DC, 4);
    // A queued sender dies: its message goes with it.
    s.call(a, send(2, 1, FOREVER));
    s.disconnect(a);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // A client awaiting its reply dies: the reply finds nobody.
    s.call(c, sendrec(2, 2, FOREVER));
    s.call(b, any());
    s.expect_msg(b);
    s.disconnect(c);
    s.call(b, reply(3, 3));
    s.expect_err(b, Errno::NotWaiting);
    // A remote client dies after being taken: its node cancels, the reply finds nobody.
    s.call(r, sendrec(2, 4, FOREVER));
    s.call(b, any());
    s.expect_msg_from(b, 4, 4);
    s.disconnect(r);
    s.call(b, reply(4, 5));
    s.expect_err(b, Errno::NotWaiting);
    // Same if the reply leaves before the Cancel arrives: it is dropped at the client's node.
    let r = s.bind(2, DC, 4);
    s.call(r, sendrec(2, 6, FOREVER));
    s.call(b, any());
    s.expect_msg_from(b, 4, 6);
    s.auto_route = false;
    s.call(b, reply(4, 7));
    s.expect_done(b);
    s.disconnect(r);
    s.auto_route = true;
    s.deliver_all();
    s.idle(r);
    // A receiver dies: senders then find nobody.
    s.call(b, any());
    s.disconnect(b);
    let e = s.bind(1, DC, 5);
    s.call(e, send(2, 6, FOREVER));
    s.expect_err(e, Errno::NoSuchEndpoint);
    // Disconnecting an unknown connection or sending on it is ignored.
    s.core(1).on_local_disconnect(12345);
    s.call(
        P {
            node: 1,
            conn: 12345,
        },
        LocalRequest::GetEp,
    );
    s.idle(P {
        node: 1,
        conn: 12345,
    });
    assert!(s
        .take_others()
        .iter()
        .all(|(_, a)| matches!(a, Action::Directory(DirRequest::Unregister { .. }))));
}

// ----- lookups -----------------------------------------------------------------------------

#[test]
fn unknown_endpoint_is_looked_up_once() {
    let mut s = Sim::new();
    s.manual_lookup = true;
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, send(9, 1, FOREVER));
    s.call(b, sendrec(9, 1, FOREVER));
    assert_eq!(
        s.take_others(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 9 }))]
    );
    s.idle(a);
    s.lookup_result(1, DC, 9, None);
    s.expect_err(a, Errno::NoSuchEndpoint);
    s.expect_err(b, Errno::NoSuchEndpoint);
    // Found on node 3: registered as REMOTE there and the call goes on.
    let x = s.bind(3, DC, 9);
    s.take_frames();
    s.core(1).on_directory_update(DC, 9, None);
    assert!(s.core(1).registrations().iter().all(|(_, ep, _)| *ep != 9));
    s.call(a, send(9, 2, FOREVER));
    assert_eq!(
        s.take_others(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 9 }))]
    );
    s.lookup_result(1, DC, 9, Some(3));
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 9, Registration::Remote { node: 3 })));
    s.call(x, any());
    s.expect_msg_from(x, 1, 2);
    s.expect_done(a);
    // A caller that disconnects while looking up is simply forgotten.
    s.call(b, send(8, 1, FOREVER));
    assert_eq!(
        s.take_others(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 8 }))]
    );
    s.disconnect(b);
    s.lookup_result(1, DC, 8, None);
    s.idle(b);
}

#[test]
fn endpoint_of_another_dc() {
    let mut s = Sim::new();
    s.bind(1, DC2, 7);
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    s.call(a, send(7, 1, FOREVER));
    s.expect_err(a, Errno::OtherDc);
    s.call(b, sendrec(7, 1, FOREVER));
    s.expect_err(b, Errno::OtherDc);
    s.call(b, vcopy(7, 2, 1, FOREVER));
    s.expect_err(b, Errno::OtherDc);
}

// ----- wait_for_bind -----------------------------------------------------------------------

#[test]
fn wait_for_bind_woken_by_a_peer_or_a_local_bind_or_the_directory() {
    let mut s = Sim::new();
    let w = s.bind(1, DC, 1);
    let w2 = s.bind(1, DC, 2);
    s.call(w, wait_bind(5, FOREVER));
    s.call(w2, wait_bind(5, Timeout::Millis(1000)));
    s.idle(w);
    s.idle(w2);
    s.bind(2, DC, 5);
    s.expect_done(w);
    s.expect_done(w2);
    s.advance(2000);
    s.idle(w2);
    s.call(w, wait_bind(6, FOREVER));
    s.bind(1, DC, 6);
    s.expect_done(w);
    s.call(w, wait_bind(7, FOREVER));
    s.core(1).on_directory_update(DC, 7, Some(3));
    s.pump();
    s.expect_done(w);
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 7, Registration::Remote { node: 3 })));
    // The directory's own answer.
    s.manual_lookup = true;
    s.call(w, wait_bind(8, FOREVER));
    assert_eq!(
        s.take_others(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 8 }))]
    );
    s.lookup_result(1, DC, 8, Some(2));
    s.expect_done(w);
    // A Bound from a node outside the DC does not count.
    s.call(w, wait_bind(9, Timeout::Millis(10)));
    s.take_others();
    s.lookup_result(1, DC, 9, None);
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC2, ep: 9 })),
    );
    s.inject(
        3,
        1,
        PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 10 })),
    );
    s.idle(w);
    s.advance(10);
    s.expect_err(w, Errno::TimedOut);
    // An Unbound from a node that does not run it is ignored.
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 10 })),
    );
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 10, Registration::Remote { node: 3 })));
}

// ----- vcopy -------------------------------------------------------------------------------

/// A server `srv` on node 1 (ep 1) holding the sendrec of client `c` (ep 2, on `client_node`).
fn server_with_client(s: &mut Sim, client_node: NodeId) -> (P, P) {
    let srv = s.bind(1, DC, 1);
    let c = s.bind(client_node, DC, 2);
    s.call(c, sendrec(1, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg_from(srv, 2, 1);
    s.take_frames();
    (srv, c)
}

#[test]
fn vcopy_between_local_blocked_processes() {
    let mut s = Sim::new();
    let (srv, c) = server_with_client(&mut s, 1);
    let r = s.bind(1, DC, 3);
    s.call(r, any());
    s.call(srv, vcopy(2, 3, 4096, FOREVER));
    let others = s.take_others();
    let [(
        1,
        Action::Memory(MemoryAction::CopyLocal {
            src_pid,
            src_addr,
            dst_pid,
            dst_addr,
            len,
            done,
        }),
    )] = others[..]
    else {
        panic!("{others:?}")
    };
    assert_eq!(
        (src_pid, src_addr, dst_pid, dst_addr, len),
        (Sim::pid(c), SRC_ADDR, Sim::pid(r), DST_ADDR, 4096)
    );
    assert!(matches!(done, VcopyCompletion::Local { .. }));
    s.idle(srv);
    s.core(1).on_vcopy_local_done(done, Ok(()));
    s.pump();
    s.expect_done(srv);
    // The caller is a party itself; a failed copy reports its error.
    s.call(srv, vcopy(1, 2, 10, FOREVER));
    let others = s.take_others();
    let [(
        1,
        Action::Memory(MemoryAction::CopyLocal {
            src_pid,
            dst_pid,
            done,
            ..
        }),
    )] = others[..]
    else {
        panic!("{others:?}")
    };
    assert_eq!((src_pid, dst_pid), (Sim::pid(srv), Sim::pid(c)));
    s.core(1).on_vcopy_local_done(done, Err(Errno::BadAddress));
    s.pump();
    s.expect_err(srv, Errno::BadAddress);
    s.idle(c);
    s.idle(r);
}

#[test]
fn vcopy_argument_errors() {
    let mut s = Sim::new();
    let (srv, _c) = server_with_client(&mut s, 1);
    let free = s.bind(1, DC, 3);
    s.call(srv, vcopy(3, 1, 10, FOREVER));
    s.expect_err(srv, Errno::Busy);
    s.call(srv, vcopy(2, 3, 10, FOREVER));
    s.expect_err(srv, Errno::Busy);
    s.call(srv, vcopy(2, 1, VCOPY_MAX + 1, FOREVER));
    s.expect_err(srv, Errno::TooBig);
    s.call(srv, vcopy(2, MAX_EP as Ep, 10, FOREVER));
    s.expect_err(srv, Errno::BadEndpoint);
    s.call(srv, vcopy(9, 1, 10, FOREVER));
    s.expect_err(srv, Errno::NoSuchEndpoint);
    s.call(srv, vcopy(2, 1, 0, FOREVER));
    s.expect_done(srv);
    assert!(s.take_others().is_empty());
    s.call(srv, vcopy(2, 1, VCOPY_MAX, FOREVER));
    let others = s.take_others();
    assert!(
        matches!(
            &others[..],
            [(
                1,
                Action::Memory(MemoryAction::CopyLocal { len: VCOPY_MAX, .. })
            )]
        ),
        "{others:?}"
    );
    s.idle(free);
}

#[test]
fn vcopy_pulling_from_a_remote_source() {
    let mut s = Sim::new();
    let (srv, c) = server_with_client(&mut s, 2);
    s.call(srv, vcopy(2, 1, 100_000, FOREVER));
    let frames = s.take_frames();
    let [(
        1,
        2,
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
            op,
            caller_node: 1,
            dc: DC,
            caller: 1,
            src: 2,
            src_addr: SRC_ADDR,
            dst: 1,
            dst_addr: DST_ADDR,
            len: 100_000,
        })),
    )] = frames[..]
    else {
        panic!("{frames:?}")
    };
    let others = s.take_others();
    assert_eq!(
        others,
        vec![(
            2,
            Action::Memory(MemoryAction::Stream {
                pid: Sim::pid(c),
                src_addr: SRC_ADDR,
                len: 100_000,
                to: 1,
                op,
                caller_node: 1,
                dc: DC,
                caller: 1,
                dst: 1,
                dst_addr: DST_ADDR
            })
        )]
    );
    // The chunks arrive at node 1 and are written into the caller.
    let first = chunk(op, 1, DC, 1, 1, 0, 50_000, 100_000);
    assert_eq!(s.vcopy_chunk(1, 2, &first), Some(Sim::pid(srv)));
    s.core(1).on_vcopy_chunk_written(2, &first, Ok(()));
    s.pump();
    s.idle(srv);
    let second = chunk(op, 1, DC, 1, 1, 50_000, 50_000, 100_000);
    assert_eq!(s.vcopy_chunk(1, 2, &second), Some(Sim::pid(srv)));
    s.core(1).on_vcopy_chunk_written(2, &second, Ok(()));
    s.pump();
    s.expect_done(srv);
    // Reading the source fails at node 2.
    s.call(srv, vcopy(2, 1, 10, FOREVER));
    let frames = s.take_frames();
    let [(1, 2, PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull { op, .. })))] = frames[..] else {
        panic!("{frames:?}")
    };
    s.take_others();
    s.core(2).on_vcopy_stream_failed(1, op, Errno::BadAddress);
    s.pump();
    s.expect_err(srv, Errno::BadAddress);
    // The source is not blocked any more.
    s.call(srv, reply(2, 2));
    s.expect_done(srv);
    s.expect_msg(c);
    s.take_frames();
    s.call(srv, vcopy(2, 1, 10, FOREVER));
    s.expect_err(srv, Errno::Busy);
    let frames = s.take_frames();
    assert!(
        matches!(
            &frames[..],
            [
                (1, 2, PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull { .. }))),
                (
                    2,
                    1,
                    PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                        result: Err(Errno::Busy),
                        ..
                    }))
                )
            ]
        ),
        "{frames:?}"
    );
}

#[test]
fn vcopy_pull_checks_at_the_source_node() {
    let mut s = Sim::new();
    let (_srv, c) = server_with_client(&mut s, 2);
    // The caller runs on node 3 (node 2 refuses pulls for callers it does not know there).
    let _caller = s.bind(3, DC, 9);
    let pull = |op, caller, dst, len| {
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
            op,
            caller_node: 3,
            dc: DC,
            caller,
            src: 2,
            src_addr: 0,
            dst,
            dst_addr: 0,
            len,
        }))
    };
    s.inject(3, 2, pull(1, 9, 9, VCOPY_MAX + 1));
    s.inject(3, 2, pull(2, 9, 8, 10));
    s.inject(
        3,
        2,
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
            op: 3,
            caller_node: 3,
            dc: DC,
            caller: 9,
            src: 7,
            src_addr: 0,
            dst: 9,
            dst_addr: 0,
            len: 10,
        })),
    );
    let verdicts: Vec<_> = s.take_frames().into_iter().filter(|f| f.0 == 2).collect();
    assert_eq!(
        verdicts,
        vec![
            (
                2,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 1,
                    result: Err(Errno::TooBig)
                }))
            ),
            (
                2,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 2,
                    result: Err(Errno::NoSuchEndpoint)
                }))
            ),
            (
                2,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 3,
                    result: Err(Errno::SrcDied)
                }))
            ),
        ]
    );
    // The caller's own endpoint as destination is trusted to be on the caller's node.
    s.inject(3, 2, pull(4, 9, 9, 10));
    let others = s.take_others();
    assert!(
        matches!(&others[..], [(2, Action::Memory(MemoryAction::Stream { to: 3, op: 4, pid, .. }))] if *pid == Sim::pid(c)),
        "{others:?}"
    );
    // A local destination: copied at the source node, the result goes to the caller's node.
    let d = s.bind(2, DC, 6);
    s.call(d, any());
    s.inject(3, 2, pull(5, 9, 6, 10));
    let others = s.take_others();
    let [(
        2,
        Action::Memory(MemoryAction::CopyLocal {
            src_pid,
            dst_pid,
            done,
            ..
        }),
    )] = others[..]
    else {
        panic!("{others:?}")
    };
    assert_eq!(
        (src_pid, dst_pid, done),
        (
            Sim::pid(c),
            Sim::pid(d),
            VcopyCompletion::Remote { node: 3, op: 5 }
        )
    );
    s.core(2).on_vcopy_local_done(done, Ok(()));
    s.pump();
    assert_eq!(
        s.take_frames().last(),
        Some(&(
            2,
            3,
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                op: 5,
                result: Ok(())
            }))
        ))
    );
    // A node outside the DC.
    s.inject(
        3,
        2,
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
            op: 6,
            caller_node: 3,
            dc: DC2,
            caller: 9,
            src: 2,
            src_addr: 0,
            dst: 9,
            dst_addr: 0,
            len: 10,
        })),
    );
    assert_eq!(
        s.take_frames().last(),
        Some(&(
            2,
            3,
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                op: 6,
                result: Err(Errno::NodeNotInDc)
            }))
        ))
    );
}

#[test]
fn vcopy_local_source_remote_destination_streams_from_the_caller_node() {
    let mut s = Sim::new();
    let (srv, c) = server_with_client(&mut s, 2);
    s.call(srv, vcopy(1, 2, 500, FOREVER));
    let others = s.take_others();
    let [(
        1,
        Action::Memory(MemoryAction::Stream {
            pid,
            src_addr,
            len,
            to,
            op,
            caller_node,
            dc,
            caller,
            dst,
            dst_addr,
        }),
    )] = others[..]
    else {
        panic!("{others:?}")
    };
    assert_eq!(
        (
            pid,
            src_addr,
            len,
            to,
            caller_node,
            dc,
            caller,
            dst,
            dst_addr
        ),
        (Sim::pid(srv), SRC_ADDR, 500, 2, 1, DC, 1, 2, DST_ADDR)
    );
    // Node 2 writes into the blocked client and reports to node 1.
    let only = chunk(op, 1, DC, 1, 2, 0, 500, 500);
    assert_eq!(s.vcopy_chunk(2, 1, &only), Some(Sim::pid(c)));
    s.core(2).on_vcopy_chunk_written(1, &only, Ok(()));
    s.pump();
    s.expect_done(srv);
    // The same path carried out by the simulation's daemon.
    s.auto_vcopy = true;
    s.call(srv, vcopy(1, 2, 500, FOREVER));
    s.expect_done(srv);
    s.idle(c);
}

#[test]
fn vcopy_chunk_validation_reports_once() {
    let mut s = Sim::new();
    // Caller on node 3, source on node 2, destination on node 1.
    let k = s.bind(3, DC, 3);
    let c = s.bind(2, DC, 2);
    let d = s.bind(1, DC, 1);
    let e = s.bind(1, DC, 5);
    s.call(c, sendrec(3, 1, FOREVER));
    s.call(k, any());
    s.expect_msg(k);
    s.call(d, from(5));
    s.take_frames();
    s.call(k, vcopy(2, 1, 300, FOREVER));
    let others = s.take_others();
    let [(
        2,
        Action::Memory(MemoryAction::Stream {
            to: 1,
            op,
            caller_node: 3,
            caller: 3,
            dst: 1,
            ..
        }),
    )] = others[..]
    else {
        panic!("{others:?}")
    };
    // Valid while d is blocked.
    let part = |i: u64| chunk(op, 3, DC, 3, 1, 75 * i, 75, 300);
    assert_eq!(s.vcopy_chunk(1, 2, &part(0)), Some(Sim::pid(d)));
    s.core(1).on_vcopy_chunk_written(2, &part(0), Ok(()));
    // d leaves IPC: the next chunk fails, once.
    s.call(e, send(1, 1, FOREVER));
    s.expect_msg_from(d, 5, 1);
    s.take_frames();
    assert_eq!(s.vcopy_chunk(1, 2, &part(1)), None);
    s.pump();
    assert_eq!(
        s.take_frames(),
        vec![(
            1,
            3,
            PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                op,
                result: Err(Errno::Busy)
            }))
        )]
    );
    s.expect_err(k, Errno::Busy);
    assert_eq!(s.vcopy_chunk(1, 2, &part(2)), None);
    assert_eq!(s.vcopy_chunk(1, 2, &part(3)), None);
    s.pump();
    assert!(s.take_frames().is_empty());
    s.idle(k);
    // A chunk for an endpoint not here, or from a node outside the DC.
    assert_eq!(
        s.vcopy_chunk(1, 2, &chunk(50, 3, DC, 3, 9, 0, 10, 10)),
        None
    );
    assert_eq!(
        s.vcopy_chunk(1, 3, &chunk(51, 3, DC2, 3, 1, 0, 10, 10)),
        None
    );
    assert_eq!(
        s.vcopy_chunk(1, 2, &chunk(52, 3, NO_DC, 3, 1, 0, 10, 10)),
        None
    );
    s.pump();
    assert_eq!(
        s.take_frames(),
        vec![
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 50,
                    result: Err(Errno::DstDied)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 51,
                    result: Err(Errno::NodeNotInDc)
                }))
            ),
            (
                1,
                3,
                PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
                    op: 52,
                    result: Err(Errno::NoSuchDc)
                }))
            ),
        ]
    );
}

#[test]
fn vcopy_chunk_write_failure_and_success_at_a_third_node() {
    let mut s = Sim::new();
    let k = s.bind(3, DC, 3);
    let c = s.bind(2, DC, 2);
    let d = s.bind(1, DC, 1);
    s.call(c, sendrec(3, 1, FOREVER));
    s.call(k, any());
    s.expect_msg(k);
    s.call(d, any());
    // Success: the last chunk written closes the copy at the caller's node.
    s.call(k, vcopy(2, 1, 300, FOREVER));
    let others = s.take_others();
    let [(2, Action::Memory(MemoryAction::Stream { op, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    let only = chunk(op, 3, DC, 3, 1, 0, 300, 300);
    assert_eq!(s.vcopy_chunk(1, 2, &only), Some(Sim::pid(d)));
    s.core(1).on_vcopy_chunk_written(2, &only, Ok(()));
    s.pump();
    s.expect_done(k);
    // A write fails midway: reported once, the rest dropped.
    s.call(k, vcopy(2, 1, 300, FOREVER));
    let others = s.take_others();
    let [(2, Action::Memory(MemoryAction::Stream { op, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    let first = chunk(op, 3, DC, 3, 1, 0, 150, 300);
    assert!(s.vcopy_chunk(1, 2, &first).is_some());
    s.core(1)
        .on_vcopy_chunk_written(2, &first, Err(Errno::BadAddress));
    s.pump();
    s.expect_err(k, Errno::BadAddress);
    assert_eq!(
        s.vcopy_chunk(1, 2, &chunk(op, 3, DC, 3, 1, 150, 150, 300)),
        None
    );
    s.pump();
    s.idle(k);
    // The simulated daemon end to end.
    s.auto_vcopy = true;
    s.call(k, vcopy(2, 1, 300, FOREVER));
    s.expect_done(k);
    s.idle(c);
    s.idle(d);
}

// ----- property: random traffic over the 3-node cluster ------------------------------------

mod prop {
    use super::*;
    use proptest::arbitrary::any;
    use proptest::prelude::*;

    /// One step of a random scenario. Process indices wrap around the processes created so far.
    #[derive(Clone, Debug)]
    pub enum Step {
        Connect(NodeId),
        Bind {
            p: u8,
            ep: Ep,
        },
        Send {
            p: u8,
            dst: Ep,
            t: Timeout,
        },
        SendRec {
            p: u8,
            dst: Ep,
            t: Timeout,
        },
        Receive {
            p: u8,
            src: Option<Ep>,
            t: Timeout,
        },
        /// Reply to `dst`; `None`: a process that received a sendrec replies to its caller.
        Reply {
            p: u8,
            dst: Option<Ep>,
        },
        Notify {
            p: u8,
            dst: Ep,
            value: u64,
        },
        WaitForBind {
            p: u8,
            ep: Ep,
            t: Timeout,
        },
        Vcopy {
            p: u8,
            src: Ep,
            dst: Ep,
            t: Timeout,
        },
        Unbind(u8),
        /// A request on a connection that may be blocked (then it is closed).
        Intrude(u8),
        Disconnect(u8),
        LinkDown(NodeId, NodeId),
        LinkUp(NodeId, NodeId),
        Advance(u64),
        Deliver(u8),
    }

    fn timeout() -> impl Strategy<Value = Timeout> {
        prop_oneof![
            Just(Timeout::NoWait),
            (1u32..60).prop_map(Timeout::Millis),
            (1u32..600).prop_map(Timeout::Millis)
        ]
    }

    fn ep() -> impl Strategy<Value = Ep> {
        0..8
    }

    fn step() -> impl Strategy<Value = Step> {
        let node = 1u16..=3;
        prop_oneof![
            1 => node.clone().prop_map(Step::Connect),
            2 => (any::<u8>(), ep()).prop_map(|(p, ep)| Step::Bind { p, ep }),
            6 => (any::<u8>(), ep(), timeout()).prop_map(|(p, dst, t)| Step::Send { p, dst, t }),
            4 => (any::<u8>(), ep(), timeout()).prop_map(|(p, dst, t)| Step::SendRec { p, dst, t }),
            8 => (any::<u8>(), proptest::option::of(ep()), timeout()).prop_map(|(p, src, t)| Step::Receive { p, src, t }),
            5 => (any::<u8>(), proptest::option::weighted(0.2, ep())).prop_map(|(p, dst)| Step::Reply { p, dst }),
            3 => (any::<u8>(), ep(), 0u64..8).prop_map(|(p, dst, value)| Step::Notify { p, dst, value }),
            1 => (any::<u8>(), ep(), timeout()).prop_map(|(p, ep, t)| Step::WaitForBind { p, ep, t }),
            2 => (any::<u8>(), ep(), ep(), timeout()).prop_map(|(p, src, dst, t)| Step::Vcopy { p, src, dst, t }),
            1 => any::<u8>().prop_map(Step::Unbind),
            1 => any::<u8>().prop_map(Step::Intrude),
            1 => any::<u8>().prop_map(Step::Disconnect),
            1 => (node.clone(), node.clone()).prop_map(|(a, b)| Step::LinkDown(a, b)),
            2 => (node.clone(), node).prop_map(|(a, b)| Step::LinkUp(a, b)),
            4 => (0u64..300).prop_map(Step::Advance),
            6 => any::<u8>().prop_map(Step::Deliver),
        ]
    }

    /// What a process's pending request is, as far as the checks care.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Call {
        Other,
        /// A send of the message numbered `id`.
        Send {
            id: u64,
        },
        /// A sendrec to `dst` of the message numbered `id`.
        SendRec {
            id: u64,
            dst: Ep,
        },
        /// A receive from `src`.
        Receive {
            src: Source,
        },
    }

    struct Proc {
        p: P,
        alive: bool,
        /// A request is waiting for its response.
        pending: bool,
        call: Call,
        /// A request was sent while `pending`: the connection must be closed.
        intruded: bool,
        /// Sendrec requests received and not replied to: caller endpoint -> message number.
        owed: BTreeMap<Ep, u64>,
    }

    impl Proc {
        fn new(p: P) -> Self {
            Proc {
                p,
                alive: true,
                pending: false,
                call: Call::Other,
                intruded: false,
                owed: BTreeMap::new(),
            }
        }
    }

    struct World {
        s: Sim,
        procs: Vec<Proc>,
        /// Number of the next message sent (payload word 1), to tell messages apart.
        next_id: u64,
        /// Numbers of the messages some receiver took.
        received: BTreeSet<u64>,
        /// The process that sent each numbered message, and to which endpoint.
        sent_by: BTreeMap<u64, (usize, Ep)>,
        /// Per sending process and destination, the number of the last message taken.
        last_taken: BTreeMap<(usize, Ep), u64>,
    }

    /// `mtype` of plain sends, of sendrec requests and of replies.
    const SEND_MTYPE: i32 = 1;
    const SENDREC_MTYPE: i32 = 2;
    const REPLY_MTYPE: i32 = 3;

    fn numbered(mtype: i32, id: u64) -> Message {
        let mut m = msg(mtype);
        m.set_word(1, id);
        m
    }

    impl World {
        fn proc(&mut self, i: u8) -> Option<usize> {
            let i = i as usize % self.procs.len();
            self.procs[i].alive.then_some(i)
        }

        fn request(&mut self, i: u8, req: LocalRequest) {
            if let Some(i) = self.proc(i) {
                self.request_at(i, req);
            }
        }

        /// Process `i` sends `req`, unless it is still waiting for a response.
        fn request_at(&mut self, i: usize, req: LocalRequest) {
            if self.procs[i].pending {
                return;
            }
            self.procs[i].call = match req {
                LocalRequest::Send { msg, .. } => Call::Send { id: msg.word(1) },
                LocalRequest::SendRec { msg, dst, .. } => Call::SendRec {
                    id: msg.word(1),
                    dst,
                },
                LocalRequest::Receive { src, .. } => Call::Receive { src },
                _ => Call::Other,
            };
            if let LocalRequest::Send { dst, msg, .. } | LocalRequest::SendRec { dst, msg, .. } =
                req
            {
                self.sent_by.insert(msg.word(1), (i, dst));
            }
            self.procs[i].pending = true;
            let p = self.procs[i].p;
            self.s.call(p, req);
        }

        /// A new numbered message.
        fn message(&mut self, mtype: i32) -> Message {
            self.next_id += 1;
            numbered(mtype, self.next_id)
        }

        /// Process `p` replies to `dst`, with the number of the request it answers.
        fn reply_at(&mut self, i: usize, dst: Ep) {
            if self.procs[i].pending {
                return;
            }
            let id = self.procs[i].owed.remove(&dst).unwrap_or(0);
            self.request_at(
                i,
                LocalRequest::Reply {
                    dst,
                    msg: numbered(REPLY_MTYPE, id),
                },
            );
        }

        fn disconnect(&mut self, i: usize) {
            self.procs[i].alive = false;
            let p = self.procs[i].p;
            self.s.disconnect(p);
        }

        /// Accounts every response and closes what must be closed, until nothing moves.
        /// Also checks that no message is taken twice, that a send completes only once its
        /// message was taken, and that a sendrec gets the reply to its own request.
        fn check(&mut self) {
            loop {
                let responses = std::mem::take(&mut self.s.responses);
                for m in responses.values().flatten().filter_map(|r| match r {
                    LocalResponse::Msg(m) => Some(m),
                    _ => None,
                }) {
                    if m.mtype == SEND_MTYPE || m.mtype == SENDREC_MTYPE {
                        let id = m.word(1);
                        assert!(self.received.insert(id), "message {id} taken twice");
                        let pair = self.sent_by[&id];
                        let last = self.last_taken.insert(pair, id).unwrap_or(0);
                        assert!(
                            last < id,
                            "message {id} of (process, dst) {pair:?} taken after the later {last}"
                        );
                    }
                }
                for (p, resps) in responses {
                    let pr = self
                        .procs
                        .iter_mut()
                        .find(|x| x.p == p)
                        .expect("a response to a known process");
                    for r in resps {
                        assert!(pr.alive, "response to a disconnected {p:?}: {r:?}");
                        assert!(pr.pending, "response to {p:?} with no request: {r:?}");
                        pr.pending = false;
                        match (pr.call, &r) {
                            (Call::Send { id }, LocalResponse::Done) => {
                                assert!(
                                    self.received.contains(&id),
                                    "{p:?}: send of {id} done but never taken"
                                )
                            }
                            (Call::Send { .. }, LocalResponse::Msg(_))
                            | (Call::SendRec { .. }, LocalResponse::Done) => {
                                panic!("{p:?}: {:?} answered with {r:?}", pr.call)
                            }
                            (Call::SendRec { id, dst }, LocalResponse::Msg(m)) => {
                                assert_eq!(
                                    (m.mtype, m.word(1), m.source),
                                    (REPLY_MTYPE, id, dst),
                                    "{p:?}: wrong reply to sendrec {id}"
                                )
                            }
                            (Call::Receive { src }, LocalResponse::Msg(m)) => {
                                assert!(
                                    src.accepts(m.source),
                                    "{p:?}: receive from {src:?} got a message of {}",
                                    m.source
                                );
                                if m.mtype == SENDREC_MTYPE {
                                    pr.owed.insert(m.source, m.word(1));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                let mut close = Vec::new();
                for (n, a) in self.s.take_others() {
                    match a {
                        Action::Local(LocalAction::Close { conn, .. }) => {
                            let i = self
                                .procs
                                .iter()
                                .position(|x| x.p == P { node: n, conn })
                                .expect("known process");
                            assert!(
                                self.procs[i].intruded,
                                "unexpected close of {:?}",
                                self.procs[i].p
                            );
                            close.push(i);
                        }
                        Action::Directory(DirRequest::Unregister { .. }) => {}
                        other => panic!("unexpected action at node {n}: {other:?}"),
                    }
                }
                if close.is_empty() {
                    return;
                }
                for i in close {
                    if self.procs[i].alive {
                        self.disconnect(i);
                    }
                }
            }
        }

        fn apply(&mut self, step: Step) {
            match step {
                Step::Connect(node) => {
                    let p = self.s.connect(node);
                    self.procs.push(Proc::new(p));
                }
                Step::Bind { p, ep } => self.request(p, bind(DC, ep)),
                Step::Send { p, dst, t } => {
                    let msg = self.message(SEND_MTYPE);
                    self.request(
                        p,
                        LocalRequest::Send {
                            dst,
                            msg,
                            timeout: t,
                        },
                    );
                }
                Step::SendRec { p, dst, t } => {
                    let msg = self.message(SENDREC_MTYPE);
                    self.request(
                        p,
                        LocalRequest::SendRec {
                            dst,
                            msg,
                            timeout: t,
                        },
                    );
                }
                Step::Receive { p, src, t } => {
                    self.request(p, recv(src.map_or(Source::Any, Source::Ep), t))
                }
                Step::Reply { p, dst: Some(dst) } => {
                    if let Some(i) = self.proc(p) {
                        self.reply_at(i, dst);
                    }
                }
                Step::Reply { p, dst: None } => {
                    let servers: Vec<usize> = (0..self.procs.len())
                        .filter(|&i| self.procs[i].alive && !self.procs[i].owed.is_empty())
                        .collect();
                    if servers.is_empty() {
                        return;
                    }
                    let i = servers[p as usize % servers.len()];
                    let dst = *self.procs[i].owed.keys().next().expect("filtered");
                    self.reply_at(i, dst);
                }
                Step::Notify { p, dst, value } => self.request(p, notify(dst, value)),
                Step::WaitForBind { p, ep, t } => self.request(p, wait_bind(ep, t)),
                Step::Vcopy { p, src, dst, t } => self.request(p, vcopy(src, dst, 64, t)),
                Step::Unbind(p) => self.request(p, LocalRequest::Unbind),
                Step::Intrude(i) => {
                    let Some(i) = self.proc(i) else { return };
                    if self.procs[i].pending {
                        self.procs[i].intruded = true;
                    }
                    self.procs[i].pending = true;
                    let p = self.procs[i].p;
                    self.s.call(p, LocalRequest::GetEp);
                }
                Step::Disconnect(i) => {
                    if let Some(i) = self.proc(i) {
                        self.disconnect(i);
                    }
                }
                Step::LinkDown(a, b) => {
                    if a != b && self.s.is_up(a, b) {
                        self.s.link_down(a, b);
                    }
                }
                Step::LinkUp(a, b) => {
                    if a != b && !self.s.is_up(a, b) {
                        self.s.link_up(a, b);
                    }
                }
                Step::Advance(ms) => self.s.advance(ms),
                Step::Deliver(n) => {
                    for _ in 0..n % 8 {
                        self.s.deliver_one();
                        self.s.pump();
                    }
                }
            }
            self.check();
        }
    }

    fn run(steps: Vec<Step>) {
        let mut s = Sim::new();
        s.auto_route = false;
        s.auto_vcopy = true;
        let mut w = World {
            s,
            procs: Vec::new(),
            next_id: 0,
            received: BTreeSet::new(),
            sent_by: BTreeMap::new(),
            last_taken: BTreeMap::new(),
        };
        // Two bound processes per node to start with.
        for (k, node) in [1, 1, 2, 2, 3, 3].into_iter().enumerate() {
            let p = w.s.connect(node);
            w.procs.push(Proc::new(p));
            w.request_at(k, bind(DC, k as Ep));
            w.s.deliver_all();
            w.check();
        }
        for step in steps {
            w.apply(step);
        }
        // Everything in flight arrives, every timer fires: every call has ended.
        w.s.auto_route = true;
        w.s.deliver_all();
        for _ in 0..10 {
            w.s.advance(600_000);
            w.check();
        }
        for pr in &w.procs {
            assert!(
                !pr.alive || !pr.pending,
                "{:?} never got its response",
                pr.p
            );
        }
        for n in NODES {
            assert_eq!(w.s.core(n).poll_timeout(), None, "node {n} has timers left");
        }
        for i in 0..w.procs.len() {
            if w.procs[i].alive {
                w.disconnect(i);
            }
        }
        w.s.advance(600_000);
        w.check();
        for n in NODES {
            let regs = w.s.core(n).registrations();
            assert!(
                regs.iter()
                    .all(|(_, _, r)| !matches!(r, Registration::Local { .. })),
                "node {n}: {regs:?}"
            );
        }
        assert!(w.s.dir.is_empty(), "directory: {:?}", w.s.dir);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_traffic_answers_every_request_once(steps in proptest::collection::vec(step(), 1..80)) {
            run(steps);
        }
    }
}

/// Another node can see a registration in the directory (and send to it) before the binding
/// node has heard back from its own directory write: the message waits for the bind instead
/// of failing with "destination died"; if the bind then fails, it fails.
#[test]
fn a_message_for_an_endpoint_whose_bind_is_in_flight_waits_for_it() {
    let mut s = Sim::new();
    let client = s.bind(2, DC, 2);
    s.manual_register = true;
    let server = s.connect(1);
    s.call(server, bind(DC, 1));
    assert_eq!(s.take_others().len(), 1, "the Register action");
    // Node 2 learned from the directory watch that ep 1 runs on node 1.
    s.core(2).on_directory_update(DC, 1, Some(1));
    s.call(client, sendrec(1, 0x71, Timeout::Forever));
    s.idle(client);
    s.core(1).on_register_result(server.conn, Ok(()));
    s.pump();
    s.expect(
        server,
        LocalResponse::Ep {
            dc: DC,
            ep: 1,
            node: 1,
        },
    );
    s.call(server, any());
    s.expect_msg_from(server, 2, 0x71);
    s.call(server, reply(2, 0x72));
    s.expect_msg_from(client, 1, 0x72);

    // A bind that the directory refuses: what waited for it fails.
    let other = s.connect(1);
    s.call(other, bind(DC, 3));
    s.take_others();
    s.core(2).on_directory_update(DC, 3, Some(1));
    s.call(client, sendrec(3, 0x73, Timeout::Forever));
    s.idle(client);
    s.core(1)
        .on_register_result(other.conn, Err(Errno::AlreadyBound));
    s.pump();
    s.expect_err(other, Errno::AlreadyBound);
    s.expect_err(client, Errno::DstDied);
}
