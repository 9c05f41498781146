//! A random workload for the simulation's own tests: servers that answer every sendrec,
//! clients that call them across nodes, all driven by a PRNG seeded like the simulation.

// Each test file uses only part of this.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dvs_core::{CoreConfig, DcInfo, MigrationRequest};
use dvs_sim::req::{any, notify, FOREVER};
use dvs_sim::{Proc, Sim};
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::peer::Backend;
use dvs_wire::{DcId, Ep, Message, NodeId};

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
    /// Restored servers, by the endpoint they serve.
    moved: Vec<(Ep, Proc)>,
    restored_seen: usize,
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
        let mut sim = Sim::with_nodes(seed, NODES.map(config));
        let mut w = World {
            sim: Sim::new(0),
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
            servers: BTreeMap::new(),
            clients: Vec::new(),
            calls: BTreeMap::new(),
            taken: BTreeSet::new(),
            stray: Vec::new(),
            moved: Vec::new(),
            restored_seen: 0,
        };
        for i in 0..servers {
            let ep = Ep::from(i);
            let p = sim.bind(NODES[usize::from(i) % 3], DC, ep);
            sim.call(p, any());
            w.servers.insert(ep, p);
        }
        for i in 0..clients {
            let p = sim.bind(NODES[usize::from(i + 1) % 3], DC, Ep::from(16 + i));
            w.clients.push((p, None));
        }
        w.sim = sim;
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
            },
        );
        let req = LocalRequest::SendRec {
            dst: server,
            msg: numbered(CALL, id),
            timeout: FOREVER,
        };
        self.sim.call(client, req);
        true
    }

    /// A random client notifies a random server (never blocks, so any client may).
    pub fn notify(&mut self) {
        let (client, _) = self.clients[self.rng.usize(..self.clients.len())];
        let eps: Vec<Ep> = self.servers.keys().copied().collect();
        let dst = eps[self.rng.usize(..eps.len())];
        let pending = self
            .clients
            .iter()
            .any(|(c, w)| *c == client && w.is_some());
        if !pending {
            self.sim.call(client, notify(dst, self.rng.u64(1..100)));
            // Its answer (Done or an error) is taken by `serve` as a stray.
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
        let from = self.servers[&ep].node;
        let to = NODES[(NODES.iter().position(|&n| n == from).unwrap() + 1) % 3];
        let req = MigrationRequest {
            dc: DC,
            ep,
            to,
            backend: Backend::Criu,
            fail_at: None,
            quiesce_timeout: Duration::from_secs(2),
        };
        self.sim.start_migration(from, req).is_ok()
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
        }
        self.restored_seen += restored.len();
    }

    fn response(&mut self, p: Proc, r: LocalResponse) {
        if let Some((_, waiting)) = self.clients.iter_mut().find(|(c, _)| *c == p) {
            match (&r, waiting.take()) {
                (LocalResponse::Msg(_) | LocalResponse::Err(_), Some(id)) => {
                    self.calls.get_mut(&id).expect("a call").answers.push(r)
                }
                // A notify's answer, or a second answer to one call (the checks find it).
                (_, w) => {
                    *waiting = w;
                    self.stray.push((p, r));
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
        match r {
            LocalResponse::Msg(m) if m.mtype == CALL => {
                let id = m.word(1);
                assert!(self.taken.insert(id), "call {id} taken twice");
                self.sim.call(
                    p,
                    LocalRequest::Reply {
                        dst: m.source,
                        msg: numbered(ANSWER, id),
                    },
                );
            }
            // A notification, or its reply done (or failed: the client went away): receive.
            _ => self.sim.call(p, any()),
        }
    }

    /// Runs the simulation `ms` on, serving on the way.
    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms {
            self.sim.advance_ms(1);
            self.serve();
        }
    }

    /// Every client got exactly one answer to each call, and a call answered with a message
    /// got the reply to its own request from the server it called.
    pub fn check_answers(&self) {
        for (id, c) in &self.calls {
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
    }
}
