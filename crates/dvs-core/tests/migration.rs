//! Deterministic simulation of live migration over three node cores on [`dvs_sim::Sim`]:
//! its links carry the peer frames, its directory holds registrations and migration records,
//! and checkpoint/restore succeed (or fail on purpose) at once.

use std::collections::BTreeMap;
use std::time::Duration;

use dvs_core::{
    Action, ConnId, CoreConfig, DcInfo, DirectoryInput, FailAt, Input, LocalAction, LocalPeer,
    MigrationInput, MigrationRequest, PeerAction, ProcessAction, Registration,
};
use dvs_sim::{LinkConfig, Proc, Sim};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::peer::Backend;
use dvs_wire::{Message, NodeId, Timeout, PROTOCOL_VERSION};

const DC: u16 = 0;

/// Three nodes (0, 1, 2) of one DC, every link up.
fn cluster() -> Sim {
    let dcs = vec![DcInfo {
        id: DC,
        nodes: [0, 1, 2].into_iter().collect(),
        max_endpoints: 64,
        max_queue: 16,
        bind_uids: [0].into_iter().collect(),
    }];
    let configs = (0..3).map(|n| CoreConfig {
        node: n,
        dcs: dcs.clone(),
        migration_seed: 0,
    });
    Sim::with_nodes(0, configs)
}

/// Frames between `a` and `b` take a while: they arrive after everything else that happens
/// at once.
fn slow_link(sim: &mut Sim, a: NodeId, b: NodeId) {
    let slow = LinkConfig {
        delay: Duration::from_millis(1),
        ..LinkConfig::default()
    };
    sim.set_link(a, b, slow);
}

/// The migration tests' way of driving [`Sim`].
trait Drive {
    fn run(&mut self);
    fn wait(&mut self, d: Duration);
    fn request(&mut self, node: NodeId, conn: ConnId, req: LocalRequest);
    fn take(&mut self, node: NodeId, conn: ConnId) -> Option<LocalResponse>;
    fn bind_pid(&mut self, node: NodeId, ep: i32, pid: i32) -> ConnId;
    fn migrate(&mut self, from: NodeId, ep: i32, to: NodeId, fail_at: Option<FailAt>);
    fn start(&mut self, node: NodeId, req: MigrationRequest) -> Result<u64, String>;
    fn restored(&self) -> Vec<(NodeId, ConnId)>;
    fn registration(&self, node: NodeId, ep: i32) -> Option<Registration>;
    fn assert_runs_on(&self, ep: i32, at: NodeId);
}

impl Drive for Sim {
    /// Carries out everything, slow frames included; honest nodes never close a connection
    /// or condemn a peer.
    fn run(&mut self) {
        self.settle();
        if let Some((node, a)) = self.take_noted().into_iter().next() {
            match a {
                Action::Local(LocalAction::Close { conn, reason }) => {
                    panic!("node {node} closed conn {conn}: {reason}")
                }
                Action::Peer(PeerAction::Condemn {
                    node: peer,
                    frame,
                    reason,
                }) => panic!("node {node} refused {frame} from node {peer}: {reason}"),
                other => panic!("node {node}: unexpected {other:?}"),
            }
        }
    }

    fn wait(&mut self, d: Duration) {
        self.advance(d);
        self.run();
    }

    fn request(&mut self, node: NodeId, conn: ConnId, req: LocalRequest) {
        self.call(Proc { node, conn }, req);
        self.run();
    }

    fn take(&mut self, node: NodeId, conn: ConnId) -> Option<LocalResponse> {
        self.resp(Proc { node, conn })
    }

    fn bind_pid(&mut self, node: NodeId, ep: i32, pid: i32) -> ConnId {
        let p = self.connect_peer(node, LocalPeer::unlaunched(pid, 0));
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

    fn migrate(&mut self, from: NodeId, ep: i32, to: NodeId, fail_at: Option<FailAt>) {
        let req = MigrationRequest {
            dc: DC,
            ep,
            to,
            backend: Backend::Criu,
            fail_at,
            quiesce_timeout: Duration::from_secs(2),
        };
        self.start(from, req).expect("migration starts");
        self.run();
    }

    /// Asks node `node` to start a migration: its id or why it cannot start.
    fn start(&mut self, node: NodeId, req: MigrationRequest) -> Result<u64, String> {
        self.start_migration(node, req).map_err(|e| e.to_string())
    }

    /// The processes restored so far, as `(node, conn)`.
    fn restored(&self) -> Vec<(NodeId, ConnId)> {
        self.outcomes()
            .restored
            .iter()
            .map(|r| (r.proc.node, r.proc.conn))
            .collect()
    }

    fn registration(&self, node: NodeId, ep: i32) -> Option<Registration> {
        self.core(node)
            .registrations()
            .into_iter()
            .find(|(d, e, _)| *d == DC && *e == ep)
            .map(|(_, _, r)| r)
    }

    /// Every node agrees that `ep` runs on `at`: RUNNING there, REMOTE(at) elsewhere.
    fn assert_runs_on(&self, ep: i32, at: NodeId) {
        for n in 0..3u16 {
            match self.registration(n, ep) {
                Some(Registration::Local { .. }) => assert_eq!(
                    n, at,
                    "endpoint {ep} RUNNING on node {n}, expected only on {at}"
                ),
                Some(Registration::Remote { node }) => {
                    assert_eq!(node, at, "node {n} thinks {ep} runs on {node}")
                }
                other => assert!(n != at, "node {at} should run {ep}, has {other:?}"),
            }
        }
    }
}

fn msg(word: u64) -> Message {
    let mut m = Message::new(7);
    m.set_word(0, word);
    m
}

fn receive() -> LocalRequest {
    LocalRequest::Receive {
        src: Source::Any,
        timeout: Timeout::Forever,
    }
}

fn sendrec(dst: i32, w: u64) -> LocalRequest {
    LocalRequest::SendRec {
        dst,
        msg: msg(w),
        timeout: Timeout::Forever,
    }
}

/// Server on node0 serving a client on node2; returns (server conn, client conn).
fn setup(sim: &mut Sim) -> (ConnId, ConnId) {
    let s = sim.bind_pid(0, 1, 1000);
    let c = sim.bind_pid(2, 2, 2000);
    (s, c)
}

#[test]
fn commit_moves_the_server_and_replays_held_calls_there() {
    let mut sim = cluster();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    // The server holds a sendrec request when the migration starts: it must finish first.
    sim.request(2, c, sendrec(1, 1));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 1));
    sim.migrate(0, 1, 1, None);
    assert!(
        sim.outcomes().reports.is_empty(),
        "must wait for the reply before checkpointing"
    );
    sim.request(
        0,
        s,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(11),
        },
    );
    assert_eq!(sim.take(0, s), Some(LocalResponse::Done));
    assert!(matches!(sim.take(2, c), Some(LocalResponse::Msg(m)) if m.word(0) == 11));
    // A call issued during the move is held, not failed.
    sim.request(2, c, sendrec(1, 2));
    assert_eq!(sim.take(2, c), None);
    // Its next call (receive) makes it quiescent; the move completes.
    sim.request(0, s, receive());
    assert_eq!(sim.outcomes().reports.len(), 1, "migration finished");
    let r = &sim.outcomes().reports[0];
    assert!(r.committed, "{r:?}");
    assert_eq!(r.held, 1);
    assert_eq!(
        sim.outcomes().killed,
        vec![1000],
        "the stopped source is killed after COMMIT"
    );
    sim.assert_runs_on(1, 1);
    // The restored process continues its receive on node1 and gets the held call.
    let (rn, rc) = sim.restored()[0];
    assert_eq!(rn, 1);
    assert!(
        matches!(sim.take(1, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 2 && m.source == 2)
    );
    sim.request(
        1,
        rc,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(22),
        },
    );
    assert!(
        matches!(sim.take(2, c), Some(LocalResponse::Msg(m)) if m.word(0) == 22 && m.source == 1)
    );
    // The old connection closing (the killed process) does not unbind the endpoint.
    sim.input(0, Input::LocalDisconnect { conn: s });
    sim.run();
    sim.assert_runs_on(1, 1);
}

#[test]
fn rollback_keeps_the_server_and_replays_held_calls_to_it() {
    for fail in [FailAt::Checkpoint, FailAt::Transfer, FailAt::Restore] {
        let mut sim = cluster();
        let (s, c) = setup(&mut sim);
        sim.request(0, s, receive());
        sim.migrate(0, 1, 1, Some(fail));
        let r = sim.outcomes().reports.last().expect("finished").clone();
        assert!(!r.committed, "{fail:?}: {r:?}");
        assert!(r.error.is_some());
        sim.assert_runs_on(1, 0);
        if fail != FailAt::Checkpoint {
            assert_eq!(
                sim.outcomes().resumed,
                vec![1000],
                "{fail:?}: the stopped source resumes"
            );
        }
        // The server is still in its receive: a call now reaches it.
        sim.request(2, c, sendrec(1, 5));
        assert!(
            matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 5),
            "{fail:?}"
        );
    }
}

#[test]
fn quiesce_timeout_rolls_back_without_stopping_anything() {
    let mut sim = cluster();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 1));
    assert!(sim.take(0, s).is_some());
    // The server never replies: it is never quiescent.
    sim.migrate(0, 1, 1, None);
    sim.wait(Duration::from_secs(3));
    let r = sim.outcomes().reports.last().expect("finished");
    assert!(!r.committed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("quiescent"),
        "{r:?}"
    );
    assert!(sim.outcomes().killed.is_empty() && sim.outcomes().resumed.is_empty());
    sim.assert_runs_on(1, 0);
    // It can still reply afterwards.
    sim.request(
        0,
        s,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(3),
        },
    );
    assert!(matches!(sim.take(2, c), Some(LocalResponse::Msg(m)) if m.word(0) == 3));
}

#[test]
fn a_second_migration_of_the_same_endpoint_is_refused_before_anything_stops() {
    let mut sim = cluster();
    let (s, _c) = setup(&mut sim);
    sim.request(
        0,
        s,
        LocalRequest::Send {
            dst: 2,
            msg: msg(1),
            timeout: Timeout::Forever,
        },
    );
    // Blocked sending: not quiescent, so the first migration stays in progress.
    sim.migrate(0, 1, 1, None);
    let req = MigrationRequest {
        dc: DC,
        ep: 1,
        to: 2,
        backend: Backend::Criu,
        fail_at: None,
        quiesce_timeout: Duration::from_secs(2),
    };
    let e = sim.start(0, req).unwrap_err();
    assert!(e.contains("in progress"), "{e}");
    // Refused up front: a destination outside the DC, an unknown endpoint.
    let bad = MigrationRequest {
        dc: DC,
        ep: 9,
        to: 1,
        backend: Backend::Criu,
        fail_at: None,
        quiesce_timeout: Duration::from_secs(2),
    };
    assert!(sim.start(0, bad).unwrap_err().contains("does not run"));
    let bad = MigrationRequest {
        dc: DC,
        ep: 1,
        to: 7,
        backend: Backend::Criu,
        fail_at: None,
        quiesce_timeout: Duration::from_secs(2),
    };
    assert!(sim.start(0, bad).unwrap_err().contains("not part of DC"));
}

#[test]
fn a_client_waiting_in_sendrec_migrates_and_gets_its_reply_on_the_new_node() {
    let mut sim = cluster();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 9));
    assert!(sim.take(0, s).is_some(), "server took the request");
    // Move the client (node2 -> node1) while it waits for the reply.
    sim.migrate(2, 2, 1, None);
    assert!(
        sim.outcomes().reports.last().is_some_and(|r| r.committed),
        "{:?}",
        sim.outcomes().reports
    );
    sim.assert_runs_on(2, 1);
    sim.request(
        0,
        s,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(99),
        },
    );
    let (_, rc) = *sim.restored().last().expect("restored");
    assert!(
        matches!(sim.take(1, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 99 && m.source == 1)
    );
}

#[test]
fn notify_to_a_migrating_endpoint_is_delivered_after_the_move() {
    let mut sim = cluster();
    let (s, c) = setup(&mut sim);
    sim.request(
        0,
        s,
        LocalRequest::Send {
            dst: 2,
            msg: msg(1),
            timeout: Timeout::Forever,
        },
    );
    sim.migrate(0, 1, 1, None);
    // Not quiescent yet (blocked sending); a notify now never blocks the notifier.
    sim.request(2, c, LocalRequest::Notify { dst: 1, value: 4 });
    assert_eq!(sim.take(2, c), Some(LocalResponse::Done));
    // The client takes the server's message; the server's next receive makes it quiescent.
    sim.request(2, c, receive());
    assert!(sim.take(2, c).is_some());
    assert_eq!(sim.take(0, s), Some(LocalResponse::Done));
    sim.request(0, s, receive());
    assert!(sim.outcomes().reports.last().is_some_and(|r| r.committed));
    let (_, rc) = sim.restored()[0];
    let got = sim.take(1, rc);
    assert!(
        matches!(got, Some(LocalResponse::Msg(m)) if m.mtype == dvs_wire::message::NOTIFY_MTYPE && m.word(0) == 4),
        "{got:?}"
    );
}

#[test]
fn order_of_held_calls_is_kept() {
    let mut sim = cluster();
    let (s, _c) = setup(&mut sim);
    let others: Vec<ConnId> = (10..14).map(|ep| sim.bind_pid(2, ep, 3000 + ep)).collect();
    sim.request(
        0,
        s,
        LocalRequest::Send {
            dst: 2,
            msg: msg(0),
            timeout: Timeout::Forever,
        },
    );
    sim.migrate(0, 1, 1, None);
    for (i, o) in others.iter().enumerate() {
        sim.request(
            2,
            *o,
            LocalRequest::Send {
                dst: 1,
                msg: msg(i as u64),
                timeout: Timeout::Forever,
            },
        );
    }
    // Let the server finish its send (client 2 receives), then quiesce.
    sim.request(2, _c, receive());
    sim.request(0, s, receive());
    let (_, rc) = sim.restored()[0];
    let mut got = BTreeMap::new();
    for i in 0..others.len() {
        if let Some(LocalResponse::Msg(m)) = sim.take(1, rc) {
            got.insert(i, m.word(0));
        }
        sim.request(1, rc, receive());
    }
    assert_eq!(got.values().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

#[test]
fn participants_roll_back_when_the_coordinator_dies_before_deciding() {
    let mut sim = cluster();
    let (s, _c) = setup(&mut sim);
    // The server is blocked sending: the migration stays undecided (quiescing).
    sim.request(
        0,
        s,
        LocalRequest::Send {
            dst: 2,
            msg: msg(1),
            timeout: Timeout::Forever,
        },
    );
    sim.migrate(0, 1, 1, None);
    // node2 holds a call to the migrating server.
    let other = sim.bind_pid(2, 5, 5000);
    sim.request(2, other, sendrec(1, 7));
    assert_eq!(sim.take(2, other), None);
    // The coordinator (node0) dies: its links go down and it never decides.
    for n in [1, 2] {
        sim.input(n, Input::LinkDown { node: 0 });
    }
    sim.run();
    // After the participant timeout a participant records the rollback...
    sim.wait(Duration::from_secs(11));
    let rec = sim
        .directory()
        .migr_records()
        .values()
        .next()
        .copied()
        .expect("record");
    assert_eq!(rec.state, dvs_core::RecordState::RolledBack);
    // ...and every node applies it from the directory (the watch).
    for n in [1, 2] {
        sim.input(
            n,
            Input::Directory(DirectoryInput::MigrRecordChanged {
                dc: DC,
                ep: 1,
                record: rec,
            }),
        );
    }
    sim.run();
    // The held call is replayed to node0, whose link is down: it fails instead of hanging.
    assert!(
        matches!(sim.take(2, other), Some(LocalResponse::Err(_))),
        "the held call must not hang"
    );
}

#[test]
fn a_call_replayed_by_a_third_node_before_the_destination_commits_is_not_lost() {
    let mut sim = cluster();
    // Server on node0 (busy: not in a call yet), client on node1; the server moves to node2,
    // and the coordinator's link to node2 is slow: node1 applies COMMIT and replays its held
    // call to node2 before node2 learns of the COMMIT.
    let s = sim.bind_pid(0, 1, 1000);
    let c = sim.bind_pid(1, 2, 2000);
    slow_link(&mut sim, 0, 2);
    sim.migrate(0, 1, 2, None);
    sim.request(1, c, sendrec(1, 42));
    assert_eq!(sim.take(1, c), None, "held on node1 during the move");
    // The server's next call makes it quiescent; the move completes.
    sim.request(0, s, receive());
    let r = sim.outcomes().reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
    let (rn, rc) = *sim.restored().last().expect("restored");
    assert_eq!(rn, 2);
    let got = sim.take(2, rc);
    assert!(
        matches!(got, Some(LocalResponse::Msg(m)) if m.word(0) == 42),
        "the replayed call must reach the restored server: {got:?}"
    );
    sim.request(
        2,
        rc,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(43),
        },
    );
    assert!(matches!(sim.take(1, c), Some(LocalResponse::Msg(m)) if m.word(0) == 43));
}

#[test]
fn an_outcome_learned_from_the_directory_first_is_acknowledged_when_the_broadcast_comes() {
    let mut sim = cluster();
    // Every node applies the COMMIT from the directory watch before the coordinator's
    // broadcast reaches it: the late COMMIT is acknowledged, not applied twice, and no node
    // takes it for a forged frame (the sim fails on any refused frame).
    sim.directory_mut().watch_migr_records = true;
    let s = sim.bind_pid(0, 1, 1000);
    let c = sim.bind_pid(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let r = sim.outcomes().reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
    sim.request(1, c, sendrec(1, 7));
    let (_, rc) = *sim.restored().last().expect("restored");
    assert!(matches!(sim.take(2, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 7));
}

#[test]
fn a_rollback_decided_while_the_dump_runs_resumes_the_process_when_it_ends() {
    let mut sim = cluster();
    // The destination dies while criu is still dumping the source: the coordinator decides a
    // rollback at once; when the dump ends (leaving the process stopped) the process must be
    // resumed, and its image dropped.
    sim.hold_checkpoints = true;
    let s = sim.bind_pid(0, 1, 1000);
    let c = sim.bind_pid(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (node, id) = *sim
        .outcomes()
        .held_checkpoints
        .last()
        .expect("a dump started");
    assert_eq!(node, 0);
    for n in [0, 1] {
        sim.input(n, Input::LinkDown { node: 2 });
    }
    sim.run();
    let r = sim.outcomes().reports.last().expect("finished").clone();
    assert!(!r.committed, "{r:?}");
    assert!(
        sim.outcomes().resumed.is_empty(),
        "nothing to resume before the dump ends"
    );
    sim.input(
        0,
        Input::Migration(MigrationInput::CheckpointDone {
            id,
            result: Ok(1000),
        }),
    );
    sim.run();
    assert_eq!(
        sim.outcomes().resumed,
        vec![1000],
        "the dumped process must run again"
    );
    sim.assert_runs_on(1, 0);
    sim.request(1, c, sendrec(1, 5));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 5));
}

#[test]
fn participants_wait_for_a_slow_coordinator_that_is_still_reachable() {
    let mut sim = cluster();
    // A dump that takes longer than the participants' timeout (a big process): the
    // coordinator is alive and reachable, so nobody records a rollback behind its back.
    sim.hold_checkpoints = true;
    let s = sim.bind_pid(0, 1, 1000);
    sim.bind_pid(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (_, id) = *sim
        .outcomes()
        .held_checkpoints
        .last()
        .expect("a dump started");
    sim.wait(dvs_core::PARTICIPANT_TIMEOUT * 3);
    assert!(
        sim.outcomes().reports.is_empty(),
        "nobody may decide while the coordinator works: {:?}",
        sim.outcomes().reports
    );
    sim.input(
        0,
        Input::Migration(MigrationInput::CheckpointDone {
            id,
            result: Ok(1000),
        }),
    );
    sim.run();
    let r = sim.outcomes().reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
}

#[test]
fn a_rollback_recorded_by_another_node_is_followed_by_the_coordinator_at_once() {
    let mut sim = cluster();
    sim.hold_checkpoints = true;
    let s = sim.bind_pid(0, 1, 1000);
    let c = sim.bind_pid(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (_, id) = *sim
        .outcomes()
        .held_checkpoints
        .last()
        .expect("a dump started");
    // A participant (which lost the coordinator for a while) recorded a rollback.
    let record = dvs_core::MigrRecord {
        id,
        from: 0,
        to: 2,
        state: dvs_core::RecordState::RolledBack,
    };
    for n in 0..3 {
        sim.input(
            n,
            Input::Directory(DirectoryInput::MigrRecordChanged {
                dc: 0,
                ep: 1,
                record,
            }),
        );
    }
    sim.run();
    let r = sim.outcomes().reports.last().expect("finished").clone();
    assert!(!r.committed, "{r:?}");
    // The dump ends: the process runs again, on its node.
    sim.input(
        0,
        Input::Migration(MigrationInput::CheckpointDone {
            id,
            result: Ok(1000),
        }),
    );
    sim.run();
    assert_eq!(sim.outcomes().resumed, vec![1000]);
    sim.assert_runs_on(1, 0);
    sim.request(1, c, sendrec(1, 9));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 9));
    // A restore that finishes after the rollback: that copy is killed.
    sim.input(
        2,
        Input::Migration(MigrationInput::Restored {
            id,
            result: Ok((777, 4343)),
        }),
    );
    let actions = sim.take_actions(2);
    assert!(
        actions.contains(&Action::Process(ProcessAction::KillTree { pid: 4343 })),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Local(LocalAction::Close { conn: 777, .. }))),
        "{actions:?}"
    );
}

#[test]
fn a_reply_sent_during_the_clients_move_reaches_it_on_the_new_node() {
    let mut sim = cluster();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 9));
    assert!(sim.take(0, s).is_some(), "server took the request");
    // Move the client (node2 -> node1) while it waits; the server replies during the dump:
    // the reply is held and replayed to node1 after the commit. (In this simulation the
    // server's node learns of the move at once and holds the reply itself; the relay by the
    // client's old node, which a real cluster produces when the reply leaves before START
    // arrives, is covered by the integration test criu_client_migrated_while_in_sendrec.)
    sim.hold_checkpoints = true;
    sim.migrate(2, 2, 1, None);
    let (_, id) = *sim
        .outcomes()
        .held_checkpoints
        .last()
        .expect("a dump started");
    sim.request(
        0,
        s,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(77),
        },
    );
    sim.input(
        2,
        Input::Migration(MigrationInput::CheckpointDone {
            id,
            result: Ok(1000),
        }),
    );
    sim.run();
    assert!(sim.outcomes().reports.last().is_some_and(|r| r.committed));
    let (_, rc) = *sim.restored().last().expect("restored");
    assert!(
        matches!(sim.take(1, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 77 && m.source == 1),
        "the relayed reply must reach the migrated client"
    );
}
