//! Deterministic simulation of live migration over three sans-IO node cores: a router carries
//! peer frames, a map stands in for the directory, and checkpoint/restore succeed (or fail on
//! purpose) at once. No sockets, threads or clocks.

mod support;
use support::Drive;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use dvs_core::{
    Action, ConnId, CoreConfig, DcInfo, FailAt, LocalPeer, MigrRecord, MigrationReport,
    MigrationRequest, NodeCore, Registration,
};
use dvs_core::{DirRequest, LocalAction, PeerAction, ProcessAction, Report};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::peer::{Backend, PeerFrame};
use dvs_wire::{Message, NodeId, Timeout, PROTOCOL_VERSION};

const DC: u16 = 0;

struct Sim {
    cores: Vec<NodeCore>,
    now: Instant,
    /// Responses per (node, conn), in order.
    responses: HashMap<(NodeId, ConnId), VecDeque<LocalResponse>>,
    dir_eps: HashMap<(u16, i32), NodeId>,
    dir_migr: HashMap<(u16, i32), MigrRecord>,
    next_conn: ConnId,
    reports: Vec<MigrationReport>,
    /// Conn of the process restored on each node, by migration.
    restored: Vec<(NodeId, ConnId)>,
    /// Frames on this link (from, to) wait until nothing else is left to do: a slow link.
    slow_link: Option<(NodeId, NodeId)>,
    slow: VecDeque<PeerFrame>,
    /// The directory watch tells every other node of a decided record at once, before the
    /// coordinator's broadcast arrives.
    fast_watch: bool,
    /// Checkpoints do not complete until the test completes them (a long dump).
    slow_dumps: bool,
    dumps: Vec<(NodeId, dvs_wire::peer::MigrationId)>,
    /// pids killed and resumed by the cores.
    killed: Vec<i32>,
    resumed: Vec<i32>,
}

impl Sim {
    fn new() -> Self {
        let dcs = vec![DcInfo {
            id: DC,
            nodes: [0, 1, 2].into_iter().collect(),
            max_endpoints: 64,
            max_queue: 16,
            bind_uids: [0].into_iter().collect(),
        }];
        let mut cores: Vec<NodeCore> = (0..3)
            .map(|n| {
                NodeCore::new(CoreConfig {
                    node: n,
                    dcs: dcs.clone(),
                    migration_seed: 0,
                })
            })
            .collect();
        for (i, c) in cores.iter_mut().enumerate() {
            for n in 0..3u16 {
                if n as usize != i {
                    c.on_link_up(n);
                }
            }
        }
        let mut s = Sim {
            cores,
            now: Instant::now(),
            responses: HashMap::new(),
            dir_eps: HashMap::new(),
            dir_migr: HashMap::new(),
            next_conn: 100,
            reports: Vec::new(),
            restored: Vec::new(),
            slow_link: None,
            slow: VecDeque::new(),
            fast_watch: false,
            slow_dumps: false,
            dumps: Vec::new(),
            killed: Vec::new(),
            resumed: Vec::new(),
        };
        s.run();
        s
    }

    fn connect(&mut self, node: NodeId, pid: i32) -> ConnId {
        self.next_conn += 1;
        self.cores[node as usize].on_local_connect(self.next_conn, LocalPeer::unlaunched(pid, 0));
        self.next_conn
    }

    fn request(&mut self, node: NodeId, conn: ConnId, req: LocalRequest) {
        self.cores[node as usize].on_local_request(conn, req, self.now);
        self.run();
    }

    fn take(&mut self, node: NodeId, conn: ConnId) -> Option<LocalResponse> {
        self.responses
            .get_mut(&(node, conn))
            .and_then(|q| q.pop_front())
    }

    fn bind(&mut self, node: NodeId, ep: i32, pid: i32) -> ConnId {
        let c = self.connect(node, pid);
        self.request(
            node,
            c,
            LocalRequest::Bind {
                version: PROTOCOL_VERSION,
                dc: DC,
                ep,
            },
        );
        assert!(matches!(self.take(node, c), Some(LocalResponse::Ep { .. })));
        c
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

    /// Asks node `node` to start a migration: its id or why it cannot start (other actions
    /// it takes meanwhile are carried out as usual).
    fn start(&mut self, node: NodeId, req: MigrationRequest) -> Result<u64, String> {
        let (r, rest) = support::start_migration(&mut self.cores[node as usize], req, self.now);
        for a in rest {
            self.execute(node, a);
        }
        r
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        for c in &mut self.cores {
            c.handle_timeout(self.now);
        }
        self.run();
    }

    /// Carries out every action until the system is idle.
    fn run(&mut self) {
        // A protocol that bounces a message between nodes forever is a bug, not a hang.
        let mut budget = 100_000u32;
        loop {
            let mut any = false;
            for n in 0..self.cores.len() {
                while let Some(a) = self.cores[n].poll_action() {
                    budget = budget
                        .checked_sub(1)
                        .expect("livelock: the nodes never go idle");
                    any = true;
                    self.execute(n as NodeId, a);
                }
            }
            if !any {
                // Only now does the slow link deliver (in order).
                let Some((from, to)) = self.slow_link else {
                    return;
                };
                let Some(f) = self.slow.pop_front() else {
                    return;
                };
                self.cores[to as usize].on_peer_frame(from, f, self.now);
            }
        }
    }

    fn execute(&mut self, node: NodeId, a: Action) {
        let now = self.now;
        let core = node as usize;
        match a {
            Action::Local(LocalAction::Respond { conn, resp }) => self
                .responses
                .entry((node, conn))
                .or_default()
                .push_back(resp),
            Action::Local(LocalAction::Close { conn, reason }) => {
                panic!("node {node} closed conn {conn}: {reason}")
            }
            // Honest nodes never trip the peer checks.
            Action::Peer(PeerAction::Condemn {
                node: peer,
                frame,
                reason,
            }) => panic!("node {node} refused {frame} from node {peer}: {reason}"),
            Action::Peer(PeerAction::Send { node: to, frame })
                if self.slow_link == Some((node, to)) =>
            {
                self.slow.push_back(frame)
            }
            Action::Peer(PeerAction::Send { node: to, frame }) => {
                self.cores[to as usize].on_peer_frame(node, frame, now)
            }
            Action::Directory(DirRequest::Register { conn, dc, ep }) => {
                let r = match self.dir_eps.get(&(dc, ep)) {
                    Some(n) if *n != node => Err(dvs_wire::Errno::AlreadyBound),
                    _ => {
                        self.dir_eps.insert((dc, ep), node);
                        Ok(())
                    }
                };
                self.cores[core].on_register_result(conn, r);
            }
            Action::Directory(DirRequest::Unregister { dc, ep }) => {
                if self.dir_eps.get(&(dc, ep)) == Some(&node) {
                    self.dir_eps.remove(&(dc, ep));
                }
            }
            Action::Directory(DirRequest::Lookup { dc, ep }) => {
                let n = self.dir_eps.get(&(dc, ep)).copied();
                self.cores[core].on_lookup_result(dc, ep, n, now);
            }
            Action::Directory(DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record,
                require,
            }) => {
                let cur = self.dir_migr.get(&(dc, ep)).copied();
                let r = if require.allows(cur.as_ref()) {
                    self.dir_migr.insert((dc, ep), record);
                    Ok(())
                } else {
                    Err(cur)
                };
                let decided = r.is_ok() && record.state != dvs_core::RecordState::Started;
                self.cores[core].on_migr_record_result(id, r, now);
                if self.fast_watch && decided {
                    for n in 0..self.cores.len() {
                        if n != core {
                            self.cores[n].on_migr_record(dc, ep, record, now);
                        }
                    }
                }
            }
            Action::Directory(DirRequest::Sync { conn }) => {
                self.cores[core].on_directory_synced(conn)
            }
            Action::Directory(DirRequest::ReadMigrRecord { id, dc, ep }) => {
                let r = self.dir_migr.get(&(dc, ep)).copied();
                self.cores[core].on_migr_record_read(id, dc, ep, r, now);
            }
            Action::Directory(DirRequest::Relocate { dc, ep, node: n }) => {
                self.dir_eps.insert((dc, ep), n);
            }
            Action::Process(ProcessAction::Checkpoint { id, .. }) if self.slow_dumps => {
                self.dumps.push((node, id))
            }
            Action::Process(ProcessAction::Checkpoint { id, fail, .. }) => {
                let r = if fail {
                    Err("injected".into())
                } else {
                    Ok(1000)
                };
                self.cores[core].on_checkpoint_done(id, r, now);
            }
            Action::Process(ProcessAction::SaveSnapshot { id, data, .. }) => {
                self.cores[core].on_checkpoint_done(id, Ok(data.len() as u64), now)
            }
            Action::Process(ProcessAction::SendImage { id, to }) => {
                self.cores[to as usize].on_image_chunk(id, 1000, now);
                self.cores[core].on_image_sent(id, Ok(1000), now);
            }
            Action::Process(ProcessAction::Restore { id, fail, .. }) => {
                if fail {
                    self.cores[core].on_restored(id, Err("injected".into()), now);
                } else {
                    self.next_conn += 1;
                    let conn = self.next_conn;
                    self.cores[core].on_local_connect(conn, LocalPeer::unlaunched(0, 0));
                    self.restored.push((node, conn));
                    self.cores[core].on_restored(id, Ok((conn, 4242)), now);
                }
            }
            Action::Process(ProcessAction::KillTree { pid }) => self.killed.push(pid),
            Action::Process(ProcessAction::ResumeTree { pid }) => self.resumed.push(pid),
            Action::Report(Report::MigrFinished { report, .. }) => self.reports.push(report),
            Action::Process(ProcessAction::MigratedAway { .. })
            | Action::Report(Report::MigrProgress { .. })
            | Action::Process(ProcessAction::DropImage { .. }) => {}
            Action::Memory(_) => panic!("no vcopy in these tests"),
            Action::Report(Report::Registered { .. } | Report::MigrationAccepted { .. }) => {
                panic!("answers to the operator are taken by `start`")
            }
        }
    }

    fn registration(&self, node: NodeId, ep: i32) -> Option<Registration> {
        self.cores[node as usize]
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
    let s = sim.bind(0, 1, 1000);
    let c = sim.bind(2, 2, 2000);
    (s, c)
}

#[test]
fn commit_moves_the_server_and_replays_held_calls_there() {
    let mut sim = Sim::new();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    // The server holds a sendrec request when the migration starts: it must finish first.
    sim.request(2, c, sendrec(1, 1));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 1));
    sim.migrate(0, 1, 1, None);
    assert!(
        sim.reports.is_empty(),
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
    assert_eq!(sim.reports.len(), 1, "migration finished");
    let r = &sim.reports[0];
    assert!(r.committed, "{r:?}");
    assert_eq!(r.held, 1);
    assert_eq!(
        sim.killed,
        vec![1000],
        "the stopped source is killed after COMMIT"
    );
    sim.assert_runs_on(1, 1);
    // The restored process continues its receive on node1 and gets the held call.
    let (rn, rc) = sim.restored[0];
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
    sim.cores[0].on_local_disconnect(s);
    sim.run();
    sim.assert_runs_on(1, 1);
}

#[test]
fn rollback_keeps_the_server_and_replays_held_calls_to_it() {
    for fail in [FailAt::Checkpoint, FailAt::Transfer, FailAt::Restore] {
        let mut sim = Sim::new();
        let (s, c) = setup(&mut sim);
        sim.request(0, s, receive());
        sim.migrate(0, 1, 1, Some(fail));
        let r = sim.reports.last().expect("finished").clone();
        assert!(!r.committed, "{fail:?}: {r:?}");
        assert!(r.error.is_some());
        sim.assert_runs_on(1, 0);
        if fail != FailAt::Checkpoint {
            assert_eq!(
                sim.resumed,
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
    let mut sim = Sim::new();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 1));
    assert!(sim.take(0, s).is_some());
    // The server never replies: it is never quiescent.
    sim.migrate(0, 1, 1, None);
    sim.advance(Duration::from_secs(3));
    let r = sim.reports.last().expect("finished");
    assert!(!r.committed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("quiescent"),
        "{r:?}"
    );
    assert!(sim.killed.is_empty() && sim.resumed.is_empty());
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
    let mut sim = Sim::new();
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
    let mut sim = Sim::new();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 9));
    assert!(sim.take(0, s).is_some(), "server took the request");
    // Move the client (node2 -> node1) while it waits for the reply.
    sim.migrate(2, 2, 1, None);
    assert!(
        sim.reports.last().is_some_and(|r| r.committed),
        "{:?}",
        sim.reports
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
    let (_, rc) = *sim.restored.last().expect("restored");
    assert!(
        matches!(sim.take(1, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 99 && m.source == 1)
    );
}

#[test]
fn notify_to_a_migrating_endpoint_is_delivered_after_the_move() {
    let mut sim = Sim::new();
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
    assert!(sim.reports.last().is_some_and(|r| r.committed));
    let (_, rc) = sim.restored[0];
    let got = sim.take(1, rc);
    assert!(
        matches!(got, Some(LocalResponse::Msg(m)) if m.mtype == dvs_wire::message::NOTIFY_MTYPE && m.word(0) == 4),
        "{got:?}"
    );
}

#[test]
fn order_of_held_calls_is_kept() {
    let mut sim = Sim::new();
    let (s, _c) = setup(&mut sim);
    let others: Vec<ConnId> = (10..14).map(|ep| sim.bind(2, ep, 3000 + ep)).collect();
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
    let (_, rc) = sim.restored[0];
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
    let mut sim = Sim::new();
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
    let other = sim.bind(2, 5, 5000);
    sim.request(2, other, sendrec(1, 7));
    assert_eq!(sim.take(2, other), None);
    // The coordinator (node0) dies: its links go down and it never decides.
    for n in [1usize, 2] {
        sim.cores[n].on_link_down(0);
    }
    sim.run();
    // After the participant timeout a participant records the rollback...
    sim.advance(Duration::from_secs(11));
    let rec = sim.dir_migr.values().next().copied().expect("record");
    assert_eq!(rec.state, dvs_core::RecordState::RolledBack);
    // ...and every node applies it from the directory (the watch).
    for n in [1usize, 2] {
        sim.cores[n].on_migr_record(DC, 1, rec, sim.now);
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
    let mut sim = Sim::new();
    // Server on node0 (busy: not in a call yet), client on node1; the server moves to node2,
    // and the coordinator's link to node2 is slow: node1 applies COMMIT and replays its held
    // call to node2 before node2 learns of the COMMIT.
    let s = sim.bind(0, 1, 1000);
    let c = sim.bind(1, 2, 2000);
    sim.slow_link = Some((0, 2));
    sim.migrate(0, 1, 2, None);
    sim.request(1, c, sendrec(1, 42));
    assert_eq!(sim.take(1, c), None, "held on node1 during the move");
    // The server's next call makes it quiescent; the move completes.
    sim.request(0, s, receive());
    let r = sim.reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
    let (rn, rc) = *sim.restored.last().expect("restored");
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
    let mut sim = Sim::new();
    // Every node applies the COMMIT from the directory watch before the coordinator's
    // broadcast reaches it: the late COMMIT is acknowledged, not applied twice, and no node
    // takes it for a forged frame (the sim fails on any refused frame).
    sim.fast_watch = true;
    let s = sim.bind(0, 1, 1000);
    let c = sim.bind(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let r = sim.reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
    sim.request(1, c, sendrec(1, 7));
    let (_, rc) = *sim.restored.last().expect("restored");
    assert!(matches!(sim.take(2, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 7));
}

#[test]
fn a_rollback_decided_while_the_dump_runs_resumes_the_process_when_it_ends() {
    let mut sim = Sim::new();
    // The destination dies while criu is still dumping the source: the coordinator decides a
    // rollback at once; when the dump ends (leaving the process stopped) the process must be
    // resumed, and its image dropped.
    sim.slow_dumps = true;
    let s = sim.bind(0, 1, 1000);
    let c = sim.bind(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (node, id) = *sim.dumps.last().expect("a dump started");
    assert_eq!(node, 0);
    for n in [0usize, 1] {
        sim.cores[n].on_link_down(2);
    }
    sim.run();
    let r = sim.reports.last().expect("finished").clone();
    assert!(!r.committed, "{r:?}");
    assert!(
        sim.resumed.is_empty(),
        "nothing to resume before the dump ends"
    );
    let now = sim.now;
    sim.cores[0].on_checkpoint_done(id, Ok(1000), now);
    sim.run();
    assert_eq!(sim.resumed, vec![1000], "the dumped process must run again");
    sim.assert_runs_on(1, 0);
    sim.request(1, c, sendrec(1, 5));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 5));
}

#[test]
fn participants_wait_for_a_slow_coordinator_that_is_still_reachable() {
    let mut sim = Sim::new();
    // A dump that takes longer than the participants' timeout (a big process): the
    // coordinator is alive and reachable, so nobody records a rollback behind its back.
    sim.slow_dumps = true;
    let s = sim.bind(0, 1, 1000);
    sim.bind(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (_, id) = *sim.dumps.last().expect("a dump started");
    sim.advance(dvs_core::PARTICIPANT_TIMEOUT * 3);
    assert!(
        sim.reports.is_empty(),
        "nobody may decide while the coordinator works: {:?}",
        sim.reports
    );
    let now = sim.now;
    sim.cores[0].on_checkpoint_done(id, Ok(1000), now);
    sim.run();
    let r = sim.reports.last().expect("finished").clone();
    assert!(r.committed, "{r:?}");
    sim.assert_runs_on(1, 2);
}

#[test]
fn a_rollback_recorded_by_another_node_is_followed_by_the_coordinator_at_once() {
    let mut sim = Sim::new();
    sim.slow_dumps = true;
    let s = sim.bind(0, 1, 1000);
    let c = sim.bind(1, 2, 2000);
    sim.migrate(0, 1, 2, None);
    sim.request(0, s, receive());
    let (_, id) = *sim.dumps.last().expect("a dump started");
    // A participant (which lost the coordinator for a while) recorded a rollback.
    let record = dvs_core::MigrRecord {
        id,
        from: 0,
        to: 2,
        state: dvs_core::RecordState::RolledBack,
    };
    let now = sim.now;
    for n in 0..3 {
        sim.cores[n].on_migr_record(0, 1, record, now);
    }
    sim.run();
    let r = sim.reports.last().expect("finished").clone();
    assert!(!r.committed, "{r:?}");
    // The dump ends: the process runs again, on its node.
    sim.cores[0].on_checkpoint_done(id, Ok(1000), now);
    sim.run();
    assert_eq!(sim.resumed, vec![1000]);
    sim.assert_runs_on(1, 0);
    sim.request(1, c, sendrec(1, 9));
    assert!(matches!(sim.take(0, s), Some(LocalResponse::Msg(m)) if m.word(0) == 9));
    // A restore that finishes after the rollback: that copy is killed.
    sim.cores[2].on_restored(id, Ok((777, 4343)), now);
    let mut actions = Vec::new();
    while let Some(a) = sim.cores[2].poll_action() {
        actions.push(a);
    }
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
    let mut sim = Sim::new();
    let (s, c) = setup(&mut sim);
    sim.request(0, s, receive());
    sim.request(2, c, sendrec(1, 9));
    assert!(sim.take(0, s).is_some(), "server took the request");
    // Move the client (node2 -> node1) while it waits; the server replies during the dump:
    // the reply is held and replayed to node1 after the commit. (In this simulation the
    // server's node learns of the move at once and holds the reply itself; the relay by the
    // client's old node, which a real cluster produces when the reply leaves before START
    // arrives, is covered by the integration test criu_client_migrated_while_in_sendrec.)
    sim.slow_dumps = true;
    sim.migrate(2, 2, 1, None);
    let (_, id) = *sim.dumps.last().expect("a dump started");
    sim.request(
        0,
        s,
        LocalRequest::Reply {
            dst: 2,
            msg: msg(77),
        },
    );
    let now = sim.now;
    sim.cores[2].on_checkpoint_done(id, Ok(1000), now);
    sim.run();
    assert!(sim.reports.last().is_some_and(|r| r.committed));
    let (_, rc) = *sim.restored.last().expect("restored");
    assert!(
        matches!(sim.take(1, rc), Some(LocalResponse::Msg(m)) if m.word(0) == 77 && m.source == 1),
        "the relayed reply must reach the migrated client"
    );
}
