//! The simulation's failure hooks: link order under delays, cuts, crashes and restarts,
//! held directory answers, phantom nodes.

mod workload;

use std::time::Duration;

use dvs_core::{Action, Input, PeerAction, Registration};
use dvs_sim::req::{any, bind, notify, sendrec, FOREVER};
use dvs_sim::{Event, LinkConfig, Sim};
use dvs_wire::local::LocalResponse;
use dvs_wire::peer::{Bound, IpcFrame, PeerFrame};
use dvs_wire::Errno;
use workload::{config, DC, NODES};

fn cluster(seed: u64) -> Sim {
    Sim::with_nodes(seed, NODES.map(config))
}

/// The frames `from` sent `to`, and those `to` was handed from `from`, in trace order.
fn sent_and_received(s: &Sim, from: u16, to: u16) -> (Vec<String>, Vec<String>) {
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for e in s.trace() {
        match e {
            Event::Action {
                node,
                action: Action::Peer(PeerAction::Send { node: t, frame }),
                ..
            } if *node == from && *t == to => sent.push(format!("{frame:?}")),
            Event::Input {
                node,
                input: Input::PeerFrame { from: f, frame },
                ..
            } if *node == to && *f == from => got.push(format!("{frame:?}")),
            _ => {}
        }
    }
    (sent, got)
}

#[test]
fn a_link_keeps_its_order_whatever_the_delays() {
    let mut s = cluster(3);
    s.reorder = true;
    s.set_default_link(LinkConfig {
        delay: Duration::from_millis(1),
        jitter: Duration::from_millis(20),
        drop: 0.0,
    });
    let server = s.bind(2, DC, 1);
    let clients: Vec<_> = (0..4u16)
        .map(|i| s.bind(1 + i % 3, DC, 10 + i32::from(i)))
        .collect();
    for v in 1..=50 {
        let c = clients[v as usize % clients.len()];
        s.call(c, notify(1, v));
        s.advance(Duration::from_micros(300));
    }
    s.advance(Duration::from_secs(1));
    let (sent, got) = sent_and_received(&s, 1, 2);
    assert!(sent.len() > 10);
    assert_eq!(sent, got, "frames of one link arrive in sending order");
    let (sent, got) = sent_and_received(&s, 3, 2);
    assert_eq!(sent, got);
    s.call(server, any());
    assert!(matches!(s.resp(server), Some(LocalResponse::Msg(_))));
}

#[test]
fn a_cut_link_loses_what_was_in_flight_and_heals() {
    let mut s = cluster(0);
    s.auto_route = false;
    let server = s.bind(2, DC, 1);
    let client = s.bind(1, DC, 2);
    s.deliver_all();
    s.call(client, sendrec(1, 5, FOREVER));
    assert_eq!(s.in_flight().len(), 1);
    s.link_down(1, 2);
    assert!(s.in_flight().is_empty());
    assert!(s.trace().iter().any(|e| matches!(e, Event::Lost { .. })));
    s.expect_err(client, Errno::NodeUnreachable);
    s.auto_route = true;
    s.link_up(1, 2);
    s.call(server, any());
    s.call(client, sendrec(1, 6, FOREVER));
    s.expect_msg_from(server, 2, 6);
}

#[test]
fn a_crashed_node_is_gone_until_it_restarts_with_a_fresh_core() {
    let mut s = cluster(0);
    let server = s.bind(2, DC, 1);
    let client = s.bind(1, DC, 2);
    s.call(server, any());
    s.call(client, sendrec(1, 5, FOREVER));
    s.expect_msg_from(server, 2, 5);
    s.crash(2);
    assert!(!s.is_alive(2));
    assert!(!s.core(1).link_up(2) && !s.core(3).link_up(2));
    s.expect_err(client, Errno::NodeUnreachable);
    s.restart(2);
    assert!(s.core(1).link_up(2) && s.core(2).link_up(1) && s.core(2).link_up(3));
    assert!(s.core(2).registrations().iter().all(|(_, ep, _)| *ep != 1));
    // As the daemon at start: what named node 2 in the directory was stale and is gone, and
    // the fresh core knows the rest.
    assert_eq!(s.directory().node_of(DC, 1), None);
    assert_eq!(
        s.core(2).registrations(),
        [(DC, 2, Registration::Remote { node: 1 })]
    );
    s.bind(3, DC, 1);
}

#[test]
fn a_held_directory_answers_when_released() {
    let mut s = cluster(0);
    s.hold_directory(1);
    let p = s.connect(1);
    s.call(p, bind(DC, 4));
    s.idle(p);
    assert_eq!(s.directory().pending().count(), 1);
    s.release_directory(1);
    s.expect(
        p,
        LocalResponse::Ep {
            dc: DC,
            ep: 4,
            node: 1,
        },
    );
    // A slow directory: the answer comes when its time does.
    s.directory_mut().delay = Duration::from_millis(5);
    let q = s.connect(3);
    s.call(q, bind(DC, 5));
    s.advance(Duration::from_millis(4));
    s.idle(q);
    s.advance(Duration::from_millis(1));
    s.expect(
        q,
        LocalResponse::Ep {
            dc: DC,
            ep: 5,
            node: 3,
        },
    );
}

#[test]
fn a_phantom_node_gets_frames_and_speaks_by_injection() {
    let mut s = Sim::new(0);
    s.add_node(config(1));
    s.add_phantom(2);
    s.link_up(1, 2);
    s.bind(1, DC, 3);
    assert_eq!(
        s.received(2),
        [PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 3 }))]
    );
    s.inject(
        2,
        1,
        PeerFrame::Ipc(IpcFrame::Bound(Bound { dc: DC, ep: 3 })),
    );
    assert!(matches!(
        s.take_noted()[..],
        [(1, Action::Peer(PeerAction::Condemn { node: 2, .. }))]
    ));
}
