//! A random workload for the simulation's own tests: servers that answer every sendrec,
//! clients that call and notify them across nodes, all driven by a PRNG seeded like the
//! simulation. What every process got is checked as it arrives (`order`), and nodes may crash
//! and restart under it (`crashes`).

// Each test file uses only part of this.
#![allow(dead_code)]

mod crashes;
mod order;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dvs_core::{CoreConfig, DcInfo, MigrationRequest};
use dvs_sim::req::{any, notify, FOREVER};
use dvs_sim::{Proc, Sim};
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::message::NOTIFY_MTYPE;
use dvs_wire::peer::{Backend, MigrationId};
use dvs_wire::{DcId, Ep, Message, NodeId, Timeout};

pub use order::Order;

pub const DC: DcId = 1;
pub const NODES: [NodeId; 3] = [1, 2, 3];
/// Message type of calls, and of replies.
pub const CALL: i32 = 10;
pub const ANSWER: i32 = 11;

pub fn config(node: NodeId) -> CoreConfig {
    CoreConfig {
        node,
        dcs: vec![DcInfo {
            id: DC,
            nodes: NODES.into_iter().collect(),
            max_endpoints: 32,
            max_queue: 64,
            bind_uids: [0].into_iter().collect(),
        }],
        migration_seed: 0,
    }
}

/// One call a client made: which server, and what it got back.
#[derive(Debug)]
pub struct Call {
    pub client: Proc,
    pub server: Ep,
    pub answers: Vec<LocalResponse>,
    /// The client died (its node crashed) before an answer: none is owed.
    pub caller_died: bool,
}

/// A migration the workload started.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    pub id: MigrationId,
    pub coordinator: NodeId,
    pub at: Duration,
}

/// Servers on every node, clients on every node, and what happened to every call.
pub struct World {
    pub sim: Sim,
    pub rng: fastrand::Rng,
    /// Server processes by endpoint (a migrated server's restored process replaces it).
    pub servers: BTreeMap<Ep, Proc>,
    /// Client processes, and the call each one waits for.
    pub clients: Vec<(Proc, Option<u64>)>,
    /// Every call by number (payload word 1).
    pub calls: BTreeMap<u64, Call>,
    /// Numbers of the calls some server took.
    pub taken: BTreeSet<u64>,
    /// Responses to processes the workload no longer drives (a migrated server's old one).
    pub stray: Vec<(Proc, LocalResponse)>,
    /// Violations seen as responses arrived (a second answer, a call taken twice, order).
    pub broken: Vec<String>,
    /// Give some calls a finite timeout (else every call waits forever).
    pub timeouts: bool,
    /// Migrations started.
    pub migrations: Vec<Started>,
    /// Order of calls and notifications per pair of endpoints.
    pub order: Order,
    /// Restored servers, by the endpoint they serve.
    moved: Vec<(Ep, Proc)>,
    restored_seen: usize,
    /// Endpoints of the processes, clients and servers alike.
    eps: BTreeMap<Proc, Ep>,
    /// Endpoints whose process died with its node, to bind again once it is back.
    pub dead: BTreeMap<Ep, NodeId>,
    /// Servers that died with a node (the node last seen), to tell a crash's victims from
    /// servers lost otherwise.
    lost_in_crash: BTreeMap<Ep, NodeId>,
}

fn numbered(mtype: i32, id: u64) -> Message {
    let mut m = Message::new(mtype);
    m.set_word(1, id);
    m
}

impl World {
    /// Three nodes, `servers` servers (ep 0..) and `clients` clients (ep 16..) spread over
    /// them round robin; the simulation and the workload both seeded with `seed`.
    pub fn new(seed: u64, servers: u16, clients: u16) -> Self {
        Self::with_sim(seed, servers, clients, |_| {})
    }

    /// [`World::new`], with `setup` run on the simulation before any process starts (to set
    /// up the directory's watches, tracing, ...).
    pub fn with_sim(seed: u64, servers: u16, clients: u16, setup: impl FnOnce(&mut Sim)) -> Self {
        let mut sim = Sim::with_nodes(seed, NODES.map(config));
        setup(&mut sim);
        let mut w = World {
            sim,
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
            servers: BTreeMap::new(),
            clients: Vec::new(),
            calls: BTreeMap::new(),
            taken: BTreeSet::new(),
            stray: Vec::new(),
            broken: Vec::new(),
            timeouts: false,
            migrations: Vec::new(),
            order: Order::default(),
            moved: Vec::new(),
            restored_seen: 0,
            eps: BTreeMap::new(),
            dead: BTreeMap::new(),
            lost_in_crash: BTreeMap::new(),
        };
        for i in 0..servers {
            let ep = Ep::from(i);
            let p = w.sim.bind(NODES[usize::from(i) % 3], DC, ep);
            w.sim.call(p, any());
            w.servers.insert(ep, p);
            w.eps.insert(p, ep);
        }
        for i in 0..clients {
            let ep = Ep::from(16 + i);
            let p = w.sim.bind(NODES[usize::from(i + 1) % 3], DC, ep);
            w.clients.push((p, None));
            w.eps.insert(p, ep);
        }
        w
    }

    /// A client not waiting for an answer calls a random server; false if all are busy.
    pub fn call(&mut self) -> bool {
        let idle: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].1.is_none())
            .collect();
        if idle.is_empty() {
            return false;
        }
        let i = idle[self.rng.usize(..idle.len())];
        let eps: Vec<Ep> = self.servers.keys().copied().collect();
        let server = eps[self.rng.usize(..eps.len())];
        let id = self.calls.len() as u64 + 1;
        let client = self.clients[i].0;
        self.clients[i].1 = Some(id);
        self.calls.insert(
            id,
            Call {
                client,
                server,
                answers: Vec::new(),
                caller_died: false,
            },
        );
        self.order.sync(self.sim.disruptions());
        self.order.sent_call(id);
        // A finite timeout also exercises cancellation: the call may be under way (held for
        // a migration, queued at the server) when its caller gives up and calls again.
        let timeout = if self.timeouts && self.rng.u8(0..4) == 0 {
            Timeout::Millis(self.rng.u32(20..400))
        } else {
            FOREVER
        };
        let req = LocalRequest::SendRec {
            dst: server,
            msg: numbered(CALL, id),
            timeout,
        };
        self.sim.call(client, req);
        true
    }

    /// A random client notifies a random server (never blocks, so any client not waiting
    /// may); the answer (`Done` or an error) comes at once.
    pub fn notify(&mut self) {
        let (client, waiting) = self.clients[self.rng.usize(..self.clients.len())];
        let eps: Vec<Ep> = self.servers.keys().copied().collect();
        let dst = eps[self.rng.usize(..eps.len())];
        if waiting.is_some() {
            return;
        }
        self.order.sync(self.sim.disruptions());
        let Some(value) = self.order.next_notify(self.eps[&client], dst) else {
            return;
        };
        self.sim.call(client, notify(dst, value));
        match self.sim.resp(client) {
            Some(LocalResponse::Done | LocalResponse::Err(_)) => {}
            other => self
                .broken
                .push(format!("notify of {client:?} answered {other:?}")),
        }
    }

    /// Moves a random server to another node (it must be in its receive: always, between
    /// steps); the migration goes on while the workload does.
    pub fn migrate(&mut self) {
        self.try_migrate();
    }

    /// [`World::migrate`]; whether the migration started (it is refused while another one of
    /// the same server is under way, or when the link to the destination is down).
    pub fn try_migrate(&mut self) -> bool {
        let eps: Vec<Ep> = self.servers.keys().copied().collect();
        let ep = eps[self.rng.usize(..eps.len())];
        self.migrate_ep(ep)
    }

    /// Migrates server `ep` from where it runs to the next node; whether it started.
    pub fn migrate_ep(&mut self, ep: Ep) -> bool {
        let from = (self.running_on(ep).first().copied()).unwrap_or(self.servers[&ep].node);
        let to = NODES[(NODES.iter().position(|&n| n == from).unwrap() + 1) % 3];
        if !self.sim.is_alive(from) {
            return false;
        }
        let req = MigrationRequest {
            dc: DC,
            ep,
            to,
            backend: Backend::Criu,
            fail_at: None,
            quiesce_timeout: Duration::from_secs(2),
        };
        match self.sim.start_migration(from, req) {
            Ok(id) => {
                let at = self.sim.elapsed();
                self.migrations.push(Started {
                    id,
                    coordinator: from,
                    at,
                });
                true
            }
            Err(_) => false,
        }
    }

    /// Takes every response: servers reply to what they took and receive again, clients
    /// record their answers.
    pub fn serve(&mut self) {
        for _ in 0..100_000 {
            self.adopt_restored();
            let responses = self.sim.take_responses();
            if responses.is_empty() {
                return;
            }
            for (p, rs) in responses {
                for r in rs {
                    self.response(p, r);
                }
            }
        }
        panic!("the processes never stop getting responses");
    }

    /// A restored server takes over from the old one (if its migration rolls back, the
    /// restored copy is closed and the old one gets the answers again: both are served).
    fn adopt_restored(&mut self) {
        let restored = &self.sim.outcomes().restored[self.restored_seen..];
        for r in restored {
            self.moved.push((r.ep, r.proc));
            self.eps.insert(r.proc, r.ep);
        }
        self.restored_seen += restored.len();
    }

    fn response(&mut self, p: Proc, r: LocalResponse) {
        if let Some((_, waiting)) = self.clients.iter_mut().find(|(c, _)| *c == p) {
            match (&r, waiting.take()) {
                (LocalResponse::Msg(_) | LocalResponse::Err(_), Some(id)) => {
                    let call = self.calls.get_mut(&id).expect("a call");
                    if let LocalResponse::Msg(m) = &r {
                        if (m.mtype, m.word(1), m.source) != (ANSWER, id, call.server) {
                            self.broken
                                .push(format!("call {id}: wrong answer {m:?} ({call:?})"));
                        }
                    }
                    call.answers.push(r);
                }
                // An answer to a client that waits for none: a call answered twice.
                (_, w) => {
                    *waiting = w;
                    self.broken
                        .push(format!("{p:?} answered {r:?} while waiting for no call"));
                }
            }
            return;
        }
        if let Some(&(ep, _)) = self.moved.iter().find(|(_, s)| *s == p) {
            self.servers.insert(ep, p);
        }
        if !self.servers.values().any(|s| *s == p) && !self.moved.iter().any(|(_, s)| *s == p) {
            self.stray.push((p, r));
            return;
        }
        self.order.sync(self.sim.disruptions());
        let me = self.eps[&p];
        match r {
            LocalResponse::Msg(m) if m.mtype == CALL => {
                let id = m.word(1);
                if !self.taken.insert(id) {
                    self.broken.push(format!("call {id} taken twice"));
                }
                match self.calls.get(&id) {
                    Some(c) if c.server == me && self.eps.get(&c.client) == Some(&m.source) => {
                        if let Err(e) = self.order.took_call(m.source, me, id) {
                            self.broken.push(e);
                        }
                    }
                    c => self
                        .broken
                        .push(format!("server {me} took {m:?}, which is {c:?}")),
                }
                self.sim.call(
                    p,
                    LocalRequest::Reply {
                        dst: m.source,
                        msg: numbered(ANSWER, id),
                    },
                );
            }
            LocalResponse::Msg(m) if m.mtype == NOTIFY_MTYPE => {
                if let Err(e) = self.order.took_notify(m.source, me, m.word(0)) {
                    self.broken.push(e);
                }
                self.sim.call(p, any());
            }
            // Its reply done (or failed: the client went away): receive.
            _ => self.sim.call(p, any()),
        }
    }

    /// Runs the simulation `ms` on, serving every process as soon as it gets a response:
    /// the clock jumps from one due event to the next.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.sim.elapsed() + Duration::from_millis(ms);
        loop {
            self.serve();
            let now = self.sim.elapsed();
            match self.sim.next_due().filter(|t| *t < end) {
                Some(t) => self.sim.advance(t.saturating_sub(now)),
                None => {
                    self.sim.advance(end.saturating_sub(now));
                    self.serve();
                    return;
                }
            }
        }
    }

    /// Every client alive got exactly one answer to each call, and a call answered with a
    /// message got the reply to its own request from the server it called.
    pub fn check_answers(&self) {
        for (id, c) in &self.calls {
            if c.caller_died {
                continue;
            }
            assert_eq!(c.answers.len(), 1, "call {id}: {c:?}");
            if let LocalResponse::Msg(m) = &c.answers[0] {
                assert_eq!(
                    (m.mtype, m.word(1), m.source),
                    (ANSWER, *id, c.server),
                    "call {id}: wrong answer"
                );
            }
        }
        let answered = self.clients.iter().filter(|(_, w)| w.is_some()).count();
        assert_eq!(answered, 0, "clients still waiting: {:?}", self.clients);
        assert!(self.broken.is_empty(), "{:?}", self.broken);
    }
}
