//! Binding endpoints, looking them up in the directory, and waiting for a bind.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use dvs_core::{
    Action, DirRequest, DirectoryInput, Input, LocalAction, Registration, RegistrationKind,
};
use dvs_sim::DirKind;
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::{Bound, IpcFrame, PeerFrame, Unbound};
use dvs_wire::{Ep, Errno, Timeout, PROTOCOL_VERSION};

// ----- bind --------------------------------------------------------------------------------

#[test]
fn bind_registers_locally_in_the_directory_and_at_peers() {
    let mut s = cluster();
    let a = s.bind(1, DC, 3);
    assert_eq!(
        s.core(1).registrations(),
        vec![(DC, 3, Registration::Local { conn: a.conn })]
    );
    assert_eq!(s.core(1).local_pid(DC, 3), Some(Sim::pid(a)));
    assert_eq!(s.directory().endpoints().get(&(DC, 3)), Some(&1));
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
    let mut s = cluster();
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
    assert!(s.directory().endpoints().is_empty());
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
    let mut s = cluster();
    manual(&mut s, DirKind::Register, true);
    let a = s.connect(1);
    s.call(a, bind(DC, 1));
    let regs = s.take_noted();
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
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: a.conn,
            result: Ok(()),
        }),
    );
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
    assert!(s.take_noted().is_empty());
    // The same connection binding again.
    s.call(a, bind(DC, 2));
    s.expect_err(a, Errno::ConnAlreadyBound);
    s.call(a, bind(DC, 1));
    s.expect_err(a, Errno::ConnAlreadyBound);
    assert!(s.take_noted().is_empty());
}

#[test]
fn bind_refused_by_the_directory() {
    let mut s = cluster();
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
    manual(&mut s, DirKind::Register, true);
    s.call(c, bind(DC, 2));
    assert_eq!(
        s.take_noted(),
        vec![(
            2,
            Action::Directory(DirRequest::Register {
                conn: c.conn,
                dc: DC,
                ep: 2
            })
        )]
    );
    s.input(
        2,
        Input::Directory(DirectoryInput::Registered {
            conn: c.conn,
            result: Err(Errno::Permission),
        }),
    );
    s.pump();
    s.expect_err(c, Errno::Permission);
    assert!(s.core(2).registrations().iter().all(|(_, ep, _)| *ep != 2));
    // And the connection can try again.
    manual(&mut s, DirKind::Register, false);
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
    let mut s = cluster();
    manual(&mut s, DirKind::Register, true);
    let a = s.connect(1);
    let b = s.connect(1);
    s.call(a, bind(DC, 4));
    s.call(b, bind(DC, 4));
    assert_eq!(s.take_noted().len(), 2);
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: a.conn,
            result: Ok(()),
        }),
    );
    // The directory lets the second through: its key names this node.
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: b.conn,
            result: Ok(()),
        }),
    );
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
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: b.conn,
            result: Ok(()),
        }),
    );
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: a.conn,
            result: Err(Errno::Permission),
        }),
    );
    s.pump();
    s.idle(a);
    s.idle(b);
}

#[test]
fn disconnect_while_binding_unregisters_and_ignores_the_late_answer() {
    let mut s = cluster();
    manual(&mut s, DirKind::Register, true);
    let a = s.connect(1);
    s.call(a, bind(DC, 4));
    // A request while the bind is in progress breaks the protocol.
    s.call(a, LocalRequest::GetEp);
    let others = s.take_noted();
    assert_eq!(others.len(), 2);
    assert!(
        matches!(others[1], (1, Action::Local(LocalAction::Close { conn, .. })) if conn == a.conn)
    );
    s.disconnect(a);
    assert_eq!(
        s.take_noted(),
        vec![(
            1,
            Action::Directory(DirRequest::Unregister { dc: DC, ep: 4 })
        )]
    );
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: a.conn,
            result: Ok(()),
        }),
    );
    s.pump();
    s.idle(a);
    assert!(s.core(1).registrations().is_empty());
}

#[test]
fn unbind_releases_the_endpoint() {
    let mut s = cluster();
    let a = s.bind(1, DC, 3);
    let b = s.bind(1, DC, 4);
    s.call(b, send(3, 1, FOREVER));
    s.idle(b);
    s.take_frames();
    s.take_noted();
    s.call(a, LocalRequest::Unbind);
    s.expect_done(a);
    s.expect_err(b, Errno::DstDied);
    assert_eq!(
        s.take_noted(),
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
    assert!(!s.directory().endpoints().contains_key(&(DC, 3)));
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
    let mut s = cluster();
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
    assert!(s.take_noted().is_empty());
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

// ----- lookups -----------------------------------------------------------------------------

#[test]
fn unknown_endpoint_is_looked_up_once() {
    let mut s = cluster();
    manual(&mut s, DirKind::Lookup, true);
    let a = s.bind(1, DC, 1);
    let b = s.bind(1, DC, 2);
    s.call(a, send(9, 1, FOREVER));
    s.call(b, sendrec(9, 1, FOREVER));
    assert_eq!(
        s.take_noted(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 9 }))]
    );
    s.idle(a);
    lookup_result(&mut s, 1, DC, 9, None);
    s.expect_err(a, Errno::NoSuchEndpoint);
    s.expect_err(b, Errno::NoSuchEndpoint);
    // Found on node 3: registered as REMOTE there and the call goes on.
    let x = s.bind(3, DC, 9);
    s.take_frames();
    s.input(
        1,
        Input::Directory(DirectoryInput::Changed {
            dc: DC,
            ep: 9,
            node: None,
        }),
    );
    assert!(s.core(1).registrations().iter().all(|(_, ep, _)| *ep != 9));
    s.call(a, send(9, 2, FOREVER));
    assert_eq!(
        s.take_noted(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 9 }))]
    );
    lookup_result(&mut s, 1, DC, 9, Some(3));
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
        s.take_noted(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 8 }))]
    );
    s.disconnect(b);
    lookup_result(&mut s, 1, DC, 8, None);
    s.idle(b);
}

#[test]
fn endpoint_of_another_dc() {
    let mut s = cluster();
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
    let mut s = cluster();
    let w = s.bind(1, DC, 1);
    let w2 = s.bind(1, DC, 2);
    s.call(w, wait_bind(5, FOREVER));
    s.call(w2, wait_bind(5, Timeout::Millis(1000)));
    s.idle(w);
    s.idle(w2);
    s.bind(2, DC, 5);
    s.expect_done(w);
    s.expect_done(w2);
    s.advance_ms(2000);
    s.idle(w2);
    s.call(w, wait_bind(6, FOREVER));
    s.bind(1, DC, 6);
    s.expect_done(w);
    s.call(w, wait_bind(7, FOREVER));
    s.input(
        1,
        Input::Directory(DirectoryInput::Changed {
            dc: DC,
            ep: 7,
            node: Some(3),
        }),
    );
    s.pump();
    s.expect_done(w);
    assert!(s
        .core(1)
        .registrations()
        .contains(&(DC, 7, Registration::Remote { node: 3 })));
    // The directory's own answer.
    manual(&mut s, DirKind::Lookup, true);
    s.call(w, wait_bind(8, FOREVER));
    assert_eq!(
        s.take_noted(),
        vec![(1, Action::Directory(DirRequest::Lookup { dc: DC, ep: 8 }))]
    );
    lookup_result(&mut s, 1, DC, 8, Some(2));
    s.expect_done(w);
    // A Bound from a node outside the DC does not count.
    s.call(w, wait_bind(9, Timeout::Millis(10)));
    s.take_noted();
    lookup_result(&mut s, 1, DC, 9, None);
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
    s.advance_ms(10);
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

/// Another node can see a registration in the directory (and send to it) before the binding
/// node has heard back from its own directory write: the message waits for the bind instead
/// of failing with "destination died"; if the bind then fails, it fails.
#[test]
fn a_message_for_an_endpoint_whose_bind_is_in_flight_waits_for_it() {
    let mut s = cluster();
    let client = s.bind(2, DC, 2);
    manual(&mut s, DirKind::Register, true);
    let server = s.connect(1);
    s.call(server, bind(DC, 1));
    assert_eq!(s.take_noted().len(), 1, "the Register action");
    // Node 2 learned from the directory watch that ep 1 runs on node 1.
    s.input(
        2,
        Input::Directory(DirectoryInput::Changed {
            dc: DC,
            ep: 1,
            node: Some(1),
        }),
    );
    s.call(client, sendrec(1, 0x71, Timeout::Forever));
    s.idle(client);
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: server.conn,
            result: Ok(()),
        }),
    );
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
    s.take_noted();
    s.input(
        2,
        Input::Directory(DirectoryInput::Changed {
            dc: DC,
            ep: 3,
            node: Some(1),
        }),
    );
    s.call(client, sendrec(3, 0x73, Timeout::Forever));
    s.idle(client);
    s.input(
        1,
        Input::Directory(DirectoryInput::Registered {
            conn: other.conn,
            result: Err(Errno::AlreadyBound),
        }),
    );
    s.pump();
    s.expect_err(other, Errno::AlreadyBound);
    s.expect_err(client, Errno::DstDied);
}
