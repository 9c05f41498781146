//! Call timeouts, links going down, and processes dying while others wait on them.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use std::time::Duration;

use dvs_core::{Action, DirRequest, Input, MemoryAction};
use dvs_wire::local::{LocalRequest, Source};
use dvs_wire::peer::{Bound, Delivered, IpcFrame, PeerFrame, Reply, Unbound};
use dvs_wire::{Ep, Errno, Timeout};

// ----- timeouts ----------------------------------------------------------------------------

#[test]
fn send_timeouts() {
    let mut s = cluster();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, send(2, 1, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    assert_eq!(s.core(1).poll_timeout(), None);
    s.call(a, send(2, 2, Timeout::Millis(50)));
    assert_eq!(
        s.core(1).poll_timeout(),
        Some(s.now() + Duration::from_millis(50))
    );
    s.advance_ms(49);
    s.idle(a);
    s.advance_ms(1);
    s.expect_err(a, Errno::TimedOut);
    // The timed-out message is gone.
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    // A send taken in time is not failed later by its stale timer.
    s.call(a, send(2, 3, Timeout::Millis(50)));
    s.advance_ms(10);
    s.call(b, any());
    s.expect_msg_from(b, 1, 3);
    s.expect_done(a);
    s.call(a, send(2, 4, FOREVER));
    s.advance_ms(100);
    s.idle(a);
    s.call(b, any());
    s.expect_msg_from(b, 1, 4);
    s.expect_done(a);
}

#[test]
fn receive_timeouts() {
    let mut s = cluster();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(b, recv(Source::Any, NOWAIT));
    s.expect_err(b, Errno::TimedOut);
    s.call(b, recv(Source::Ep(1), Timeout::Millis(10)));
    s.advance_ms(9);
    s.idle(b);
    s.advance_ms(1);
    s.expect_err(b, Errno::TimedOut);
    // It is no longer receiving.
    s.call(a, send(2, 1, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    s.call(b, recv(Source::Any, Timeout::Millis(10)));
    s.call(a, send(2, 2, NOWAIT));
    s.expect_msg_from(b, 1, 2);
    s.expect_done(a);
    s.advance_ms(20);
    s.idle(b);
}

#[test]
fn sendrec_timeouts() {
    let mut s = cluster();
    let c = s.bind(1, DC, 1);
    let srv = s.bind(1, DC, 2);
    s.call(c, sendrec(2, 1, NOWAIT));
    s.expect_err(c, Errno::TimedOut);
    // Still queued when the time is up.
    s.call(c, sendrec(2, 2, Timeout::Millis(30)));
    s.advance_ms(30);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, recv(Source::Any, NOWAIT));
    s.expect_err(srv, Errno::TimedOut);
    // Taken, but no reply in time: the deadline covers the whole call.
    s.call(c, sendrec(2, 3, Timeout::Millis(30)));
    s.advance_ms(10);
    s.call(srv, any());
    s.expect_msg_from(srv, 1, 3);
    s.advance_ms(19);
    s.idle(c);
    s.advance_ms(1);
    s.expect_err(c, Errno::TimedOut);
    s.call(srv, reply(1, 4));
    s.expect_err(srv, Errno::NotWaiting);
    // Taken at once by a waiting server, no reply in time.
    s.call(srv, any());
    s.call(c, sendrec(2, 5, Timeout::Millis(30)));
    s.expect_msg_from(srv, 1, 5);
    s.advance_ms(29);
    s.idle(c);
    s.advance_ms(1);
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
    s.advance_ms(100);
    s.idle(c);
}

#[test]
fn wait_for_bind_timeouts() {
    let mut s = cluster();
    let a = s.bind(1, DC, 1);
    s.bind(2, DC, 2);
    s.call(a, wait_bind(2, NOWAIT));
    s.expect_done(a);
    s.call(a, wait_bind(1, NOWAIT));
    s.expect_done(a);
    s.call(a, wait_bind(5, NOWAIT));
    s.expect_err(a, Errno::TimedOut);
    s.call(a, wait_bind(5, Timeout::Millis(20)));
    s.advance_ms(19);
    s.idle(a);
    s.advance_ms(1);
    s.expect_err(a, Errno::TimedOut);
    s.bind(3, DC, 5);
    s.idle(a);
    s.call(a, wait_bind(MAX_EP as Ep, FOREVER));
    s.expect_err(a, Errno::BadEndpoint);
}

#[test]
fn vcopy_timeouts() {
    let mut s = cluster();
    let srv = s.bind(1, DC, 1);
    let c = s.bind(1, DC, 2);
    s.call(c, sendrec(1, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg(srv);
    s.call(srv, vcopy(2, 1, 100, Timeout::Millis(20)));
    let others = s.take_noted();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.advance_ms(19);
    s.idle(srv);
    s.advance_ms(1);
    s.expect_err(srv, Errno::TimedOut);
    // The copy finishing late does not answer twice.
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
    s.pump();
    s.idle(srv);
    // NoWait: only what completes before timers run.
    s.call(srv, vcopy(2, 1, 100, NOWAIT));
    let others = s.take_noted();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.advance_ms(0);
    s.expect_err(srv, Errno::TimedOut);
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
    s.pump();
    s.idle(srv);
    s.call(srv, vcopy(2, 1, 100, NOWAIT));
    let others = s.take_noted();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(srv);
    s.advance_ms(0);
    s.idle(srv);
    s.idle(c);
}

// ----- links -------------------------------------------------------------------------------

#[test]
fn link_down_fails_remote_callers_and_new_sends() {
    let mut s = cluster();
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
    s.input(1, Input::LinkDown { node: 2 });
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
    let mut s = cluster();
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
    let others = s.take_noted();
    let [(1, Action::Memory(MemoryAction::CopyLocal { done, .. }))] = others[..] else {
        panic!("{others:?}")
    };
    s.auto_route = false;
    s.call(srv3, vcopy(3, 4, 100, FOREVER));
    s.link_down(1, 2);
    s.idle(srv);
    s.idle(srv3);
    s.input(
        1,
        Input::VcopyLocalDone {
            done,
            result: Ok(()),
        },
    );
    s.pump();
    s.expect_done(srv);
    s.link_down(2, 3);
    s.expect_err(srv3, Errno::NodeUnreachable);
}

// ----- process death -----------------------------------------------------------------------

#[test]
fn local_process_death_fails_everyone_waiting_on_it() {
    let mut s = cluster();
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
    s.take_noted();
    s.disconnect(srv);
    s.expect_err(a, Errno::DstDied);
    s.expect_err(c, Errno::DstDied);
    s.expect_err(d, Errno::DstDied);
    s.expect_err(r, Errno::SrcDied);
    s.idle(o);
    s.idle(srv);
    assert_eq!(
        s.take_noted(),
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
    assert!(!s.directory().endpoints().contains_key(&(DC, 2)));
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    s.input(1, Input::LocalDisconnect { conn: 12345 });
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
        .take_noted()
        .iter()
        .all(|(_, a)| matches!(a, Action::Directory(DirRequest::Unregister { .. }))));
}
