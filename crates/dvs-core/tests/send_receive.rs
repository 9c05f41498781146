//! Send, receive, sendrec, reply and notify: the rendezvous semantics, locally and
//! (notify) across nodes.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use dvs_core::{Action, LocalAction};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::message::NOTIFY_MTYPE;
use dvs_wire::peer::{IpcFrame, Notify, PeerFrame};
use dvs_wire::{Ep, Errno, PROTOCOL_VERSION};

// ----- local send / receive ----------------------------------------------------------------

#[test]
fn send_then_receive_is_a_rendezvous() {
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
    let a = s.connect_as(1, 0, Some((DC, 1)));
    // Root, but launched for DC/1: another endpoint is refused, its own is not.
    s.call(a, bind(DC, 2));
    s.expect_err(a, Errno::Permission);
    s.call(a, bind(DC2, 1));
    s.expect_err(a, Errno::Permission);
    assert!(s.directory().endpoints().is_empty() && s.take_frames().is_empty());
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
    let mut s = cluster();
    // DC allows root only; DC2 allows root and 1000.
    let a = s.connect_as(1, 1000, None);
    s.call(a, bind(DC, 1));
    s.expect_err(a, Errno::Permission);
    assert!(s.directory().endpoints().is_empty() && s.core(1).registrations().is_empty());
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
    let mut s = cluster();
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, any());
    s.call(a, send(2, 1, FOREVER));
    let others = s.take_noted();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
    let mut s = cluster();
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
