//! A hostile peer: frames an honest node never sends must have no effect, and close the link.
//!
//! The simulated cluster runs node 1 (the victim) and node 3 (an honest node) as real cores;
//! node 2 is the attacker, a phantom of [`dvs_sim::Sim`]: the tests hand its frames to node 1,
//! and what node 1 sends it is kept.

use dvs_core::{
    Action, ConnId, CoreConfig, DcInfo, Input, MigrRecord, RecordState, Registration, VcopyChunk,
    VcopyCompletion, Violation,
};
use dvs_core::{DirRequest, MemoryAction, PeerAction, ProcessAction, Report};
use dvs_sim::{DirKind, Proc, Sim};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::peer::{Backend, DeliverKind, MigratedEndpoint, PeerFrame};
use dvs_wire::peer::{
    Bound, Cancel, Deliver, Delivered, IpcFrame, MigrCommit, MigrDone, MigrFrame, MigrPrepare,
    MigrRestore, MigrRestored, MigrRollback, MigrStart, MigrStartAck, Notify, Redirect, Reply,
    Unbound, VcopyDone, VcopyPull,
};
use dvs_wire::{DcId, Ep, Message, NodeId, Timeout, PROTOCOL_VERSION};
use proptest::prelude::*;

const DC: DcId = 1;
const VICTIM: NodeId = 1;
const ATTACKER: NodeId = 2;
const HONEST: NodeId = 3;

type Net = Sim;

/// The victim linked to the attacker and to the honest node. The directory leaves
/// unregistrations and migration writes to the test (none is expected); memory copies and
/// process actions too.
fn victim_cluster() -> Net {
    let dcs = vec![DcInfo {
        id: DC,
        nodes: [1, 2, 3].into_iter().collect(),
        max_endpoints: 8,
        max_queue: 4,
        bind_uids: [0].into_iter().collect(),
    }];
    let mut net = Sim::new(0);
    for n in [VICTIM, HONEST] {
        net.add_node(CoreConfig {
            node: n,
            dcs: dcs.clone(),
            migration_seed: 0,
        });
    }
    net.add_phantom(ATTACKER);
    net.auto_memory = false;
    net.auto_process = false;
    net.directory_mut().manual.extend([
        DirKind::Unregister,
        DirKind::Relocate,
        DirKind::WriteMigrRecord,
    ]);
    net.link_up(VICTIM, ATTACKER);
    net.link_up(VICTIM, HONEST);
    net
}

/// Records migration `id` of `{DC, ep}` as started in the directory (a node holding a
/// certificate can write records too, so a START the attacker made may be recorded).
fn started(net: &mut Net, ep: Ep, id: u64) {
    let record = MigrRecord {
        id,
        from: (id >> 48) as NodeId,
        to: 0,
        state: RecordState::Started,
    };
    net.directory_mut().set_migr_record(DC, ep, record);
}

/// The forged-frame tests' way of driving [`Sim`].
trait Drive {
    fn bind_ep(&mut self, node: NodeId, ep: Ep) -> ConnId;
    fn request(&mut self, node: NodeId, conn: ConnId, req: LocalRequest);
    fn take(&mut self, node: NodeId, conn: ConnId) -> Option<LocalResponse>;
    fn attack(&mut self, frame: PeerFrame);
    fn attack_chunk(&mut self, c: VcopyChunk) -> Option<i32>;
    fn to_attacker(&self) -> &[PeerFrame];
    fn table(&self) -> Vec<(DcId, Ep, Registration)>;
    fn expect_dropped(&mut self);
    fn expect_violation(&mut self) -> Violation;
}

impl Drive for Net {
    fn bind_ep(&mut self, node: NodeId, ep: Ep) -> ConnId {
        let p = self.connect(node);
        self.request(
            node,
            p.conn,
            LocalRequest::Bind {
                version: PROTOCOL_VERSION,
                dc: DC,
                ep,
            },
        );
        assert!(matches!(
            self.take(node, p.conn),
            Some(LocalResponse::Ep { .. })
        ));
        p.conn
    }

    fn request(&mut self, node: NodeId, conn: ConnId, req: LocalRequest) {
        self.call(Proc { node, conn }, req);
    }

    fn take(&mut self, node: NodeId, conn: ConnId) -> Option<LocalResponse> {
        self.resp(Proc { node, conn })
    }

    /// The attacker sends `frame` to the victim.
    fn attack(&mut self, frame: PeerFrame) {
        self.inject(ATTACKER, VICTIM, frame);
    }

    /// The attacker sends a vcopy chunk; whether the victim would write it.
    fn attack_chunk(&mut self, c: VcopyChunk) -> Option<i32> {
        let pid = self.inject_chunk(ATTACKER, VICTIM, &c);
        if pid.is_some() {
            let written = Input::VcopyChunkWritten {
                from: ATTACKER,
                chunk: c,
                result: Ok(()),
            };
            self.input(VICTIM, written);
        }
        self.pump();
        pid
    }

    /// What the victim sent the attacker.
    fn to_attacker(&self) -> &[PeerFrame] {
        self.received(ATTACKER)
    }

    fn table(&self) -> Vec<(DcId, Ep, Registration)> {
        self.core(VICTIM).registrations()
    }

    /// The victim dropped what the attacker sent without acting on it or closing the link (a
    /// message from a source the sender does not hold can be an honest late message).
    #[track_caller]
    fn expect_dropped(&mut self) {
        let others = self.take_noted();
        assert!(others.is_empty(), "expected nothing, got {others:?}");
    }

    /// The victim reported the attacker exactly once since the last call, and nothing else
    /// happened besides.
    #[track_caller]
    fn expect_violation(&mut self) -> Violation {
        let others = self.take_noted();
        match &others[..] {
            [(VICTIM, Action::Peer(PeerAction::Condemn { node, reason, .. }))]
                if *node == ATTACKER =>
            {
                let r = reason.clone();
                // The daemon closes the link; the victim sees it go down and come back.
                self.link_down(VICTIM, ATTACKER);
                self.link_up(VICTIM, ATTACKER);
                self.clear_received(ATTACKER);
                r
            }
            other => panic!("expected one violation by node {ATTACKER}, got {other:?}"),
        }
    }
}

fn recv_any() -> LocalRequest {
    LocalRequest::Receive {
        src: Source::Any,
        timeout: Timeout::Forever,
    }
}

fn chunk(op: u64, caller_node: NodeId, caller: Ep, dst: Ep, offset: u64, len: u64) -> VcopyChunk {
    VcopyChunk {
        op,
        caller_node,
        dc: DC,
        caller,
        dst,
        dst_addr: 0x7000,
        offset,
        total: 4096,
        len,
    }
}

/// A server (ep 1) blocked in receive on the victim, an honest endpoint (ep 5) on node 3.
fn setup() -> (Net, ConnId) {
    let mut net = victim_cluster();
    let srv = net.bind_ep(VICTIM, 1);
    net.bind_ep(HONEST, 5);
    net.request(VICTIM, srv, recv_any());
    net.take_noted();
    (net, srv)
}

#[test]
fn forged_vcopy_data_is_not_written() {
    let (mut net, _srv) = setup();
    // For a vcopy of the victim's own callers: none is outstanding.
    assert_eq!(net.attack_chunk(chunk(7, VICTIM, 1, 1, 0, 4096)), None);
    assert!(matches!(
        net.expect_violation(),
        Violation::NeverIssued { op: 7 }
    ));
    // For an invented caller "on" the attacker, and for a caller of another node
    // (third-party form) that runs here: not written, and the caller is told. Not a
    // violation: a stale registration here can make an honest copy look like these.
    assert_eq!(net.attack_chunk(chunk(7, ATTACKER, 6, 1, 0, 4096)), None);
    net.expect_dropped();
    assert!(net.to_attacker().iter().any(|f| matches!(
        f,
        PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
            op: 7,
            result: Err(dvs_wire::Errno::Permission)
        }))
    )));
    assert_eq!(net.attack_chunk(chunk(8, HONEST, 1, 1, 0, 4096)), None);
    net.expect_dropped();
    // Chunk bounds outside the copy.
    assert_eq!(net.attack_chunk(chunk(9, ATTACKER, 6, 1, 4000, 200)), None);
    assert!(matches!(
        net.expect_violation(),
        Violation::MalformedChunk { .. }
    ));
}

#[test]
fn chunks_of_an_accepted_stream_must_follow_it() {
    let (mut net, srv) = setup();
    // The attacker's own endpoint 6 copies into the blocked server: a legitimate vcopy.
    net.attack(PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 6 })));
    let pid = net.core(VICTIM).local_pid(DC, 1);
    assert_eq!(net.attack_chunk(chunk(3, ATTACKER, 6, 1, 0, 1024)), pid);
    // A gap, then a different address range: refused.
    assert_eq!(net.attack_chunk(chunk(3, ATTACKER, 6, 1, 2048, 1024)), None);
    assert!(matches!(
        net.expect_violation(),
        Violation::ChunkMismatch { op: 3, .. }
    ));
    let mut moved = chunk(4, ATTACKER, 6, 1, 0, 1024);
    assert_eq!(net.attack_chunk(moved), pid);
    moved.dst_addr = 0x1000;
    moved.offset = 1024;
    assert_eq!(net.attack_chunk(moved), None);
    assert!(matches!(
        net.expect_violation(),
        Violation::ChunkMismatch { op: 4, .. }
    ));
    assert_eq!(net.take(VICTIM, srv), None);
}

#[test]
fn forged_vcopy_pull_streams_nothing() {
    let (mut net, _srv) = setup();
    let pull = |caller_node, caller| {
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
            op: 1,
            caller_node,
            dc: DC,
            caller,
            src: 1,
            src_addr: 0x7ff0_0000,
            dst: caller,
            dst_addr: 0,
            len: 4096,
        }))
    };
    // An invented caller on the attacker, reading the server's stack back: refused, the
    // caller's node gets the error, nothing is read.
    net.attack(pull(ATTACKER, 6));
    net.expect_dropped();
    assert!(net.to_attacker().iter().any(|f| matches!(
        f,
        PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
            op: 1,
            result: Err(dvs_wire::Errno::Permission)
        }))
    )));
    // On behalf of another node's caller.
    net.attack(pull(HONEST, 5));
    assert_eq!(
        net.expect_violation(),
        Violation::NotCallerNode {
            caller_node: HONEST
        }
    );
    // Speaking for the honest node's endpoint: refused the same way.
    net.clear_received(ATTACKER);
    net.attack(pull(ATTACKER, 5));
    net.expect_dropped();
    assert!(net.to_attacker().iter().any(|f| matches!(
        f,
        PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone {
            op: 1,
            result: Err(dvs_wire::Errno::Permission)
        }))
    )));
}

fn deliver(src: Ep, dst: Ep) -> PeerFrame {
    PeerFrame::Ipc(IpcFrame::Deliver(Deliver {
        op: 1,
        dc: DC,
        src,
        dst,
        kind: DeliverKind::SendRec,
        msg: Message::new(1),
        timeout: Timeout::Forever,
    }))
}

/// A message from a source the sending node does not hold is not served (it is dropped, the
/// link kept: a message sent before its source unbound can honestly arrive after the
/// endpoint bound again elsewhere).
#[test]
fn deliver_from_an_endpoint_the_sender_does_not_run_is_not_served() {
    let (mut net, srv) = setup();
    let other = net.bind_ep(VICTIM, 2);
    let before = net.table();
    for src in [2, 5] {
        net.attack(deliver(src, 1));
        net.expect_dropped();
        assert_eq!(net.take(VICTIM, srv), None, "served a forged message");
        assert_eq!(net.table(), before, "routing changed");
    }
    // A forged reply to a waiting local client, and a forged notification.
    net.request(VICTIM, other, send_rec(5));
    net.attack(PeerFrame::Ipc(IpcFrame::Reply(Reply {
        dc: DC,
        src: 5,
        dst: 2,
        result: Ok(Message::new(9)),
    })));
    net.expect_dropped();
    net.attack(PeerFrame::Ipc(IpcFrame::Notify(Notify {
        dc: DC,
        src: 1,
        dst: 2,
        value: 1,
    })));
    net.expect_dropped();
    assert_eq!(net.take(VICTIM, other), None);
    assert_eq!(net.table(), before);
}

fn send_rec(dst: Ep) -> LocalRequest {
    LocalRequest::SendRec {
        dst,
        msg: Message::new(4),
        timeout: Timeout::Forever,
    }
}

#[test]
fn forged_migr_start_holds_nothing() {
    let (mut net, _srv) = setup();
    let client = net.bind_ep(VICTIM, 2);
    let start = |ep, from| {
        PeerFrame::Migr(MigrFrame::Start(MigrStart {
            id: (ATTACKER as u64) << 48 | 1,
            dc: DC,
            ep,
            from,
            to: ATTACKER,
            backend: Backend::Criu,
        }))
    };
    // An endpoint of the honest node, in the attacker's name or in the honest node's.
    net.attack(start(5, ATTACKER));
    net.expect_violation();
    net.attack(start(5, HONEST));
    net.expect_violation();
    // The victim's own endpoint.
    net.attack(start(1, ATTACKER));
    net.expect_violation();
    assert!(!net.core(VICTIM).migrating(DC, 5));
    assert!(!net.core(VICTIM).migrating(DC, 1));
    // Calls to it are not held: they go to node 3 and are served there.
    net.request(VICTIM, client, send_rec(5));
    assert!(net.take_noted().is_empty());
    assert!(net
        .in_flight()
        .iter()
        .all(|(_, _, f)| !matches!(f, PeerFrame::Ipc(IpcFrame::Redirect(Redirect { .. })))));
}

#[test]
fn forged_migr_commit_does_not_reroute() {
    let (mut net, _srv) = setup();
    let before = net.table();
    net.attack(PeerFrame::Migr(MigrFrame::Commit(MigrCommit {
        id: (ATTACKER as u64) << 48 | 1,
        dc: DC,
        ep: 5,
        to: ATTACKER,
    })));
    // Nothing held: left to the directory, quietly (a late link may miss START honestly).
    assert!(net.take_noted().is_empty());
    assert_eq!(net.table(), before);
    // A real migration of ep 5 by node 3: the attacker cannot decide it.
    let id = (HONEST as u64) << 48 | 7;
    started(&mut net, 5, id);
    net.input(
        VICTIM,
        Input::PeerFrame {
            from: HONEST,
            frame: PeerFrame::Migr(MigrFrame::Start(MigrStart {
                id,
                dc: DC,
                ep: 5,
                from: HONEST,
                to: VICTIM,
                backend: Backend::Criu,
            })),
        },
    );
    net.pump();
    net.attack(PeerFrame::Migr(MigrFrame::Commit(MigrCommit {
        id,
        dc: DC,
        ep: 5,
        to: ATTACKER,
    })));
    assert!(matches!(
        net.expect_violation(),
        Violation::ForeignMigrationId { .. }
    ));
    assert!(net.core(VICTIM).migrating(DC, 5));
    assert_eq!(net.table(), before);
}

#[test]
fn bound_and_unbound_do_not_rewrite_routing() {
    let (mut net, _srv) = setup();
    let before = net.table();
    net.attack(PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 1 })));
    assert_eq!(
        net.expect_violation(),
        Violation::EndpointIsLocal { dc: DC, ep: 1 }
    );
    // Another live node's endpoint: the directory decides, quietly.
    net.attack(PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 5 })));
    net.attack(PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 5 })));
    net.attack(PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc: DC, ep: 1 })));
    assert!(net.take_noted().is_empty());
    assert_eq!(net.table(), before);
}

#[test]
fn forged_prepare_and_restore_launch_nothing() {
    let (mut net, _srv) = setup();
    let id = (ATTACKER as u64) << 48 | 3;
    started(&mut net, 6, id);
    let prepare = |ep| {
        PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
            id,
            dc: DC,
            ep,
            backend: Backend::Cooperative,
            state: MigratedEndpoint {
                call: None,
                notifies: vec![],
            },
            fail_restore: false,
        }))
    };
    // Without a START naming this node as destination.
    net.attack(prepare(6));
    net.attack(PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })));
    // A START by the attacker for its own endpoint, naming node 3 as destination.
    net.attack(PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 6 })));
    net.attack(PeerFrame::Migr(MigrFrame::Start(MigrStart {
        id,
        dc: DC,
        ep: 6,
        from: ATTACKER,
        to: HONEST,
        backend: Backend::Criu,
    })));
    net.attack(prepare(6));
    assert_eq!(net.expect_violation(), Violation::NotDestination { id });
    net.attack(PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id })));
    assert!(net.take_noted().is_empty(), "no restore, no checkpoint");
    assert!(net.to_attacker().iter().any(|f| matches!(
        f,
        PeerFrame::Migr(MigrFrame::Restored(MigrRestored { result: Err(_), .. }))
    )));
}

// ----- a hostile peer, at random ------------------------------------------------------------

fn hostile_frame() -> impl Strategy<Value = PeerFrame> {
    let ep = 0..8i32;
    let node = 1..4u16;
    let op = 0..4u64;
    let dc = prop_oneof![Just(DC), Just(9u16)];
    let id = (1..4u64, 0..3u64).prop_map(|(n, k)| (n << 48) | k);
    prop_oneof![
        (
            op.clone(),
            dc.clone(),
            ep.clone(),
            ep.clone(),
            any::<bool>()
        )
            .prop_map(|(op, dc, src, dst, rec)| PeerFrame::Ipc(IpcFrame::Deliver(
                Deliver {
                    op,
                    dc,
                    src,
                    dst,
                    kind: if rec {
                        DeliverKind::SendRec
                    } else {
                        DeliverKind::Send
                    },
                    msg: Message::new(3),
                    timeout: Timeout::Forever,
                }
            ))),
        op.clone()
            .prop_map(|op| PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result: Ok(()) }))),
        op.clone()
            .prop_map(|op| PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op }))),
        (dc.clone(), ep.clone(), ep.clone()).prop_map(|(dc, src, dst)| PeerFrame::Ipc(
            IpcFrame::Reply(Reply {
                dc,
                src,
                dst,
                result: Ok(Message::new(8)),
            })
        )),
        (dc.clone(), ep.clone(), ep.clone()).prop_map(|(dc, src, dst)| PeerFrame::Ipc(
            IpcFrame::Notify(Notify {
                dc,
                src,
                dst,
                value: 1,
            })
        )),
        (
            op.clone(),
            node.clone(),
            ep.clone(),
            ep.clone(),
            ep.clone(),
            1..5000u64
        )
            .prop_map(|(op, caller_node, caller, src, dst, len)| {
                PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                    op,
                    caller_node,
                    dc: DC,
                    caller,
                    src,
                    src_addr: 0x1000,
                    dst,
                    dst_addr: 0x2000,
                    len,
                }))
            }),
        op.clone()
            .prop_map(|op| PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result: Ok(()) }))),
        (dc.clone(), ep.clone())
            .prop_map(|(dc, ep)| PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep }))),
        (dc.clone(), ep.clone())
            .prop_map(|(dc, ep)| PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep }))),
        (op, ep.clone()).prop_map(|(op, dst)| PeerFrame::Ipc(IpcFrame::Redirect(Redirect {
            op,
            dc: DC,
            dst
        }))),
        (id.clone(), ep.clone(), node.clone(), node.clone()).prop_map(|(id, ep, from, to)| {
            PeerFrame::Migr(MigrFrame::Start(MigrStart {
                id,
                dc: DC,
                ep,
                from,
                to,
                backend: Backend::Criu,
            }))
        }),
        id.clone()
            .prop_map(|id| PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id }))),
        (id.clone(), ep.clone(), any::<bool>()).prop_map(|(id, ep, coop)| {
            PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
                id,
                dc: DC,
                ep,
                backend: if coop {
                    Backend::Cooperative
                } else {
                    Backend::Criu
                },
                state: MigratedEndpoint {
                    call: None,
                    notifies: vec![],
                },
                fail_restore: false,
            }))
        }),
        id.clone()
            .prop_map(|id| PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id }))),
        id.clone()
            .prop_map(|id| PeerFrame::Migr(MigrFrame::Restored(MigrRestored {
                id,
                result: Err("x".into())
            }))),
        (id.clone(), ep.clone(), node.clone()).prop_map(|(id, ep, to)| PeerFrame::Migr(
            MigrFrame::Commit(MigrCommit { id, dc: DC, ep, to })
        )),
        (id.clone(), ep.clone(), node).prop_map(|(id, ep, from)| PeerFrame::Migr(
            MigrFrame::Rollback(MigrRollback {
                id,
                dc: DC,
                ep,
                from
            })
        )),
        id.prop_map(|id| PeerFrame::Migr(MigrFrame::Done(MigrDone {
            id,
            held: 3,
            longest_hold_us: 7,
        }))),
    ]
}

fn hostile_chunk() -> impl Strategy<Value = VcopyChunk> {
    (0..4u64, 1..4u16, 0..8i32, 0..8i32, 0..3u64, 1..3u64).prop_map(
        |(op, caller_node, caller, dst, part, parts)| VcopyChunk {
            op,
            caller_node,
            dc: DC,
            caller,
            dst,
            dst_addr: 0x3000,
            offset: part * 1000,
            total: parts * 1000,
            len: 1000,
        },
    )
}

#[derive(Clone, Debug)]
enum Step {
    /// The local client and server move their exchange one step on.
    Legit,
    Frame(PeerFrame),
    Chunk(VcopyChunk),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Legit),
        4 => hostile_frame().prop_map(Step::Frame),
        1 => hostile_chunk().prop_map(Step::Chunk),
    ]
}

/// Whether the attacker may act as `{DC, caller}` right now: an endpoint the victim records on
/// the attacker's node.
fn attackers(net: &mut Net, caller: Ep) -> bool {
    net.core(VICTIM).registrations().contains(&(
        DC,
        caller,
        Registration::Remote { node: ATTACKER },
    ))
}

fn run_hostile(steps: Vec<Step>) {
    let mut net = victim_cluster();
    let srv = net.bind_ep(VICTIM, 1);
    let client = net.bind_ep(VICTIM, 2);
    let mut phase = 0;
    let mut served = 0;
    for s in steps {
        match s {
            Step::Legit => legit_step(&mut net, srv, client, &mut phase, &mut served),
            Step::Frame(f) => net.attack(f),
            Step::Chunk(c) => {
                let allowed = c.caller_node == ATTACKER && attackers(&mut net, c.caller);
                let pid = net.attack_chunk(c);
                assert!(pid.is_none() || allowed, "wrote {c:?}");
            }
        }
        // Nothing but the attacker's own endpoints' vcopies touches memory; nothing migrates.
        for (n, a) in net.take_noted() {
            assert_eq!(n, VICTIM);
            match a {
                Action::Peer(PeerAction::Condemn { node, .. }) => {
                    assert_eq!(node, ATTACKER);
                    net.input(VICTIM, Input::LinkDown { node: ATTACKER });
                    net.input(VICTIM, Input::LinkUp { node: ATTACKER });
                    net.pump();
                }
                Action::Memory(MemoryAction::CopyLocal {
                    done: VcopyCompletion::Remote { node: ATTACKER, .. },
                    ..
                }) => {}
                Action::Memory(MemoryAction::Stream {
                    to: ATTACKER,
                    caller_node: ATTACKER,
                    caller,
                    ..
                }) => assert!(attackers(&mut net, caller)),
                // Participant: a forged hold times out into a rollback attempt in the directory.
                Action::Directory(DirRequest::WriteMigrRecord { .. })
                | Action::Report(Report::MigrProgress { .. }) => {}
                // A forged START naming the victim as destination, released: whatever it
                // prepared for the attacker's own migration id goes (nothing, since a START
                // the directory does not record prepares nothing).
                Action::Process(ProcessAction::DropImage { id }) if id >> 48 == ATTACKER as u64 => {
                }
                other => panic!("node {n}: {other:?}"),
            }
        }
        // The local endpoints stay the victim's.
        let regs = net.core(VICTIM).registrations();
        assert!(regs.contains(&(DC, 1, Registration::Local { conn: srv })));
        assert!(regs.contains(&(DC, 2, Registration::Local { conn: client })));
        assert!(!net.core(VICTIM).migrating(DC, 1));
        assert!(!net.core(VICTIM).migrating(DC, 2));
    }
    // The local exchange was never stopped: it finishes another round.
    let target = served + 1;
    while served < target {
        legit_step(&mut net, srv, client, &mut phase, &mut served);
    }
}

/// One step of a sendrec exchange between a local client (ep 2) and server (ep 1).
fn legit_step(net: &mut Net, srv: ConnId, client: ConnId, phase: &mut u8, served: &mut u32) {
    match *phase {
        0 => {
            let from2 = LocalRequest::Receive {
                src: Source::Ep(2),
                timeout: Timeout::Forever,
            };
            net.request(VICTIM, srv, from2);
            assert_eq!(net.take(VICTIM, srv), None);
        }
        1 => {
            net.request(VICTIM, client, send_rec(1));
            let got = net.take(VICTIM, srv);
            assert!(
                matches!(&got, Some(LocalResponse::Msg(m)) if m.source == 2 && m.mtype == 4),
                "server got {got:?}"
            );
        }
        _ => {
            let reply = LocalRequest::Reply {
                dst: 2,
                msg: Message::new(5),
            };
            net.request(VICTIM, srv, reply);
            assert_eq!(net.take(VICTIM, srv), Some(LocalResponse::Done));
            let got = net.take(VICTIM, client);
            assert!(
                matches!(&got, Some(LocalResponse::Msg(m)) if m.source == 1 && m.mtype == 5),
                "client got {got:?}"
            );
            *served += 1;
        }
    }
    *phase = (*phase + 1) % 3;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_hostile_peer_cannot_touch_memory_or_stop_local_ipc(steps in proptest::collection::vec(step(), 1..60)) {
        run_hostile(steps);
    }
}

/// A MIGR_START that the directory does not record (the attacker did not, or could not,
/// write the record) holds calls only until the node has checked the directory.
#[test]
fn an_unrecorded_migr_start_holds_nothing() {
    let (mut net, _srv) = setup();
    net.attack(PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 6 })));
    net.attack(PeerFrame::Migr(MigrFrame::Start(MigrStart {
        id: (ATTACKER as u64) << 48 | 9,
        dc: DC,
        ep: 6,
        from: ATTACKER,
        to: HONEST,
        backend: Backend::Criu,
    })));
    assert!(
        !net.core(VICTIM).migrating(DC, 6),
        "calls to an endpoint must not be held for a migration nobody recorded"
    );
}
