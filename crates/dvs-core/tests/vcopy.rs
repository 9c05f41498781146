//! vcopy between processes on one node or across nodes, and the checks of its chunks.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use dvs_core::{Action, Input, MemoryAction, VcopyCompletion, VCOPY_MAX};
use dvs_wire::peer::{IpcFrame, PeerFrame, VcopyDone, VcopyPull};
use dvs_wire::{Ep, Errno};

// ----- vcopy -------------------------------------------------------------------------------

#[test]
fn vcopy_between_local_blocked_processes() {
    let mut s = cluster();
    let (srv, c) = server_with_client(&mut s, 1);
    let r = s.bind(1, DC, 3);
    s.call(r, any());
    s.call(srv, vcopy(2, 3, 4096, FOREVER));
    let others = s.take_noted();
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
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(srv);
    // The caller is a party itself; a failed copy reports its error.
    s.call(srv, vcopy(1, 2, 10, FOREVER));
    let others = s.take_noted();
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
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Err(Errno::BadAddress),
        },
    );
    s.pump();
    s.expect_err(srv, Errno::BadAddress);
    s.idle(c);
    s.idle(r);
}

#[test]
fn vcopy_argument_errors() {
    let mut s = cluster();
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
    assert!(s.take_noted().is_empty());
    s.call(srv, vcopy(2, 1, VCOPY_MAX, FOREVER));
    let others = s.take_noted();
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
    let mut s = cluster();
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
    let others = s.take_noted();
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
    assert_eq!(s.inject_chunk(2, 1, &first), Some(Sim::pid(srv)));
    s.input(
        1,
        Input::VcopyChunkWritten {
            from: 2,
            chunk: first,
            result: Ok(()),
        },
    );
    s.pump();
    s.idle(srv);
    let second = chunk(op, 1, DC, 1, 1, 50_000, 50_000, 100_000);
    assert_eq!(s.inject_chunk(2, 1, &second), Some(Sim::pid(srv)));
    s.input(
        1,
        Input::VcopyChunkWritten {
            from: 2,
            chunk: second,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(srv);
    // Reading the source fails at node 2.
    s.call(srv, vcopy(2, 1, 10, FOREVER));
    let frames = s.take_frames();
    let [(1, 2, PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull { op, .. })))] = frames[..] else {
        panic!("{frames:?}")
    };
    s.take_noted();
    s.input(
        2,
        Input::VcopyStreamFailed {
            caller_node: 1,
            op,
            error: Errno::BadAddress,
        },
    );
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
    let mut s = cluster();
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
    let others = s.take_noted();
    assert!(
        matches!(&others[..], [(2, Action::Memory(MemoryAction::Stream { to: 3, op: 4, pid, .. }))] if *pid == Sim::pid(c)),
        "{others:?}"
    );
    // A local destination: copied at the source node, the result goes to the caller's node.
    let d = s.bind(2, DC, 6);
    s.call(d, any());
    s.inject(3, 2, pull(5, 9, 6, 10));
    let others = s.take_noted();
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
    s.input(
        2,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
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
    let mut s = cluster();
    let (srv, c) = server_with_client(&mut s, 2);
    s.call(srv, vcopy(1, 2, 500, FOREVER));
    let others = s.take_noted();
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
    assert_eq!(s.inject_chunk(1, 2, &only), Some(Sim::pid(c)));
    s.input(
        2,
        Input::VcopyChunkWritten {
            from: 1,
            chunk: only,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(srv);
    // The same path carried out by the simulation's daemon.
    s.auto_memory = true;
    s.call(srv, vcopy(1, 2, 500, FOREVER));
    s.expect_done(srv);
    s.idle(c);
}

#[test]
fn vcopy_chunk_validation_reports_once() {
    let mut s = cluster();
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
    let others = s.take_noted();
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
    assert_eq!(s.inject_chunk(2, 1, &part(0)), Some(Sim::pid(d)));
    s.input(
        1,
        Input::VcopyChunkWritten {
            from: 2,
            chunk: part(0),
            result: Ok(()),
        },
    );
    // d leaves IPC: the next chunk fails, once.
    s.call(e, send(1, 1, FOREVER));
    s.expect_msg_from(d, 5, 1);
    s.take_frames();
    assert_eq!(s.inject_chunk(2, 1, &part(1)), None);
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
    assert_eq!(s.inject_chunk(2, 1, &part(2)), None);
    assert_eq!(s.inject_chunk(2, 1, &part(3)), None);
    s.pump();
    assert!(s.take_frames().is_empty());
    s.idle(k);
    // A chunk for an endpoint not here, or from a node outside the DC.
    assert_eq!(
        s.inject_chunk(2, 1, &chunk(50, 3, DC, 3, 9, 0, 10, 10)),
        None
    );
    assert_eq!(
        s.inject_chunk(3, 1, &chunk(51, 3, DC2, 3, 1, 0, 10, 10)),
        None
    );
    assert_eq!(
        s.inject_chunk(2, 1, &chunk(52, 3, NO_DC, 3, 1, 0, 10, 10)),
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
    let mut s = cluster();
    let k = s.bind(3, DC, 3);
    let c = s.bind(2, DC, 2);
    let d = s.bind(1, DC, 1);
    s.call(c, sendrec(3, 1, FOREVER));
    s.call(k, any());
    s.expect_msg(k);
    s.call(d, any());
    // Success: the last chunk written closes the copy at the caller's node.
    s.call(k, vcopy(2, 1, 300, FOREVER));
    let others = s.take_noted();
    let [(2, Action::Memory(MemoryAction::Stream { op, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    let only = chunk(op, 3, DC, 3, 1, 0, 300, 300);
    assert_eq!(s.inject_chunk(2, 1, &only), Some(Sim::pid(d)));
    s.input(
        1,
        Input::VcopyChunkWritten {
            from: 2,
            chunk: only,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(k);
    // A write fails midway: reported once, the rest dropped.
    s.call(k, vcopy(2, 1, 300, FOREVER));
    let others = s.take_noted();
    let [(2, Action::Memory(MemoryAction::Stream { op, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    let first = chunk(op, 3, DC, 3, 1, 0, 150, 300);
    assert!(s.inject_chunk(2, 1, &first).is_some());
    s.input(
        1,
        Input::VcopyChunkWritten {
            from: 2,
            chunk: first,
            result: Err(Errno::BadAddress),
        },
    );
    s.pump();
    s.expect_err(k, Errno::BadAddress);
    assert_eq!(
        s.inject_chunk(2, 1, &chunk(op, 3, DC, 3, 1, 150, 150, 300)),
        None
    );
    s.pump();
    s.idle(k);
    // The simulated daemon end to end.
    s.auto_memory = true;
    s.call(k, vcopy(2, 1, 300, FOREVER));
    s.expect_done(k);
    s.idle(c);
    s.idle(d);
}
