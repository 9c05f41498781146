//! Sends and sendrecs across nodes: delivery, cancels, late replies, forged or stale
//! deliveries.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use dvs_core::Registration;
use dvs_sim::DirKind;
use dvs_wire::local::Source;
use dvs_wire::peer::{
    Backend, Cancel, Deliver, DeliverKind, Delivered, IpcFrame, MigrFrame, MigrStart, Notify,
    PeerFrame, Reply,
};
use dvs_wire::{Ep, Errno, Timeout};

// ----- remote send / sendrec ---------------------------------------------------------------

#[test]
fn remote_send_completes_only_when_taken() {
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
    let a = s.bind(1, DC, 1);
    let b = s.bind(2, DC, 2);
    // The destination node times the queued message out and says so.
    s.call(a, send(2, 1, Timeout::Millis(50)));
    s.advance_ms(49);
    s.idle(a);
    s.advance_ms(1);
    s.expect_err(a, Errno::TimedOut);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // Its verdict is lost: the sender gives up after a grace period and cancels.
    s.auto_route = false;
    s.call(a, send(2, 2, Timeout::Millis(50)));
    s.advance_ms(249);
    s.idle(a);
    s.take_frames();
    s.advance_ms(1);
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    s.advance_ms(1000);
    s.expect_err(c1, Errno::TimedOut);
}

#[test]
fn late_reply_to_an_abandoned_sendrec_is_not_taken_for_the_next_one() {
    let mut s = cluster();
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
    s.advance_ms(1000);
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
    s.advance_ms(1000);
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    manual(&mut s, DirKind::Lookup, true);
    s.call(b, send(9, 2, FOREVER));
    assert!(s.take_noted().is_empty());
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
            backend: Backend::Criu,
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
