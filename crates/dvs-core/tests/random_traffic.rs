//! Random traffic over the 3-node cluster: every request is answered once.
//!
//! Runs on the shared simulated cluster of `common` (see [`dvs_sim::Sim`]).

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};

use dvs_core::{Action, DirRequest, LocalAction, Registration};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::{Ep, Message, NodeId, Timeout};

// ----- property: random traffic over the 3-node cluster ------------------------------------

mod prop {
    use super::*;
    use proptest::arbitrary::any;
    use proptest::prelude::*;

    /// One step of a random scenario. Process indices wrap around the processes created so far.
    #[derive(Clone, Debug)]
    pub enum Step {
        Connect(NodeId),
        Bind {
            p: u8,
            ep: Ep,
        },
        Send {
            p: u8,
            dst: Ep,
            t: Timeout,
        },
        SendRec {
            p: u8,
            dst: Ep,
            t: Timeout,
        },
        Receive {
            p: u8,
            src: Option<Ep>,
            t: Timeout,
        },
        /// Reply to `dst`; `None`: a process that received a sendrec replies to its caller.
        Reply {
            p: u8,
            dst: Option<Ep>,
        },
        Notify {
            p: u8,
            dst: Ep,
            value: u64,
        },
        WaitForBind {
            p: u8,
            ep: Ep,
            t: Timeout,
        },
        Vcopy {
            p: u8,
            src: Ep,
            dst: Ep,
            t: Timeout,
        },
        Unbind(u8),
        /// A request on a connection that may be blocked (then it is closed).
        Intrude(u8),
        Disconnect(u8),
        LinkDown(NodeId, NodeId),
        LinkUp(NodeId, NodeId),
        Advance(u64),
        Deliver(u8),
    }

    fn timeout() -> impl Strategy<Value = Timeout> {
        prop_oneof![
            Just(Timeout::NoWait),
            (1u32..60).prop_map(Timeout::Millis),
            (1u32..600).prop_map(Timeout::Millis)
        ]
    }

    fn ep() -> impl Strategy<Value = Ep> {
        0..8
    }

    fn step() -> impl Strategy<Value = Step> {
        let node = 1u16..=3;
        prop_oneof![
            1 => node.clone().prop_map(Step::Connect),
            2 => (any::<u8>(), ep()).prop_map(|(p, ep)| Step::Bind { p, ep }),
            6 => (any::<u8>(), ep(), timeout()).prop_map(|(p, dst, t)| Step::Send { p, dst, t }),
            4 => (any::<u8>(), ep(), timeout()).prop_map(|(p, dst, t)| Step::SendRec { p, dst, t }),
            8 => (any::<u8>(), proptest::option::of(ep()), timeout()).prop_map(|(p, src, t)| Step::Receive { p, src, t }),
            5 => (any::<u8>(), proptest::option::weighted(0.2, ep())).prop_map(|(p, dst)| Step::Reply { p, dst }),
            3 => (any::<u8>(), ep(), 0u64..8).prop_map(|(p, dst, value)| Step::Notify { p, dst, value }),
            1 => (any::<u8>(), ep(), timeout()).prop_map(|(p, ep, t)| Step::WaitForBind { p, ep, t }),
            2 => (any::<u8>(), ep(), ep(), timeout()).prop_map(|(p, src, dst, t)| Step::Vcopy { p, src, dst, t }),
            1 => any::<u8>().prop_map(Step::Unbind),
            1 => any::<u8>().prop_map(Step::Intrude),
            1 => any::<u8>().prop_map(Step::Disconnect),
            1 => (node.clone(), node.clone()).prop_map(|(a, b)| Step::LinkDown(a, b)),
            2 => (node.clone(), node).prop_map(|(a, b)| Step::LinkUp(a, b)),
            4 => (0u64..300).prop_map(Step::Advance),
            6 => any::<u8>().prop_map(Step::Deliver),
        ]
    }

    /// What a process's pending request is, as far as the checks care.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Call {
        Other,
        /// A send of the message numbered `id`.
        Send {
            id: u64,
        },
        /// A sendrec to `dst` of the message numbered `id`.
        SendRec {
            id: u64,
            dst: Ep,
        },
        /// A receive from `src`.
        Receive {
            src: Source,
        },
    }

    struct Proc {
        p: P,
        alive: bool,
        /// A request is waiting for its response.
        pending: bool,
        call: Call,
        /// A request was sent while `pending`: the connection must be closed.
        intruded: bool,
        /// Sendrec requests received and not replied to: caller endpoint -> message number.
        owed: BTreeMap<Ep, u64>,
    }

    impl Proc {
        fn new(p: P) -> Self {
            Proc {
                p,
                alive: true,
                pending: false,
                call: Call::Other,
                intruded: false,
                owed: BTreeMap::new(),
            }
        }
    }

    struct World {
        s: Sim,
        procs: Vec<Proc>,
        /// Number of the next message sent (payload word 1), to tell messages apart.
        next_id: u64,
        /// Numbers of the messages some receiver took.
        received: BTreeSet<u64>,
        /// The process that sent each numbered message, and to which endpoint.
        sent_by: BTreeMap<u64, (usize, Ep)>,
        /// Per sending process and destination, the number of the last message taken.
        last_taken: BTreeMap<(usize, Ep), u64>,
    }

    /// `mtype` of plain sends, of sendrec requests and of replies.
    const SEND_MTYPE: i32 = 1;
    const SENDREC_MTYPE: i32 = 2;
    const REPLY_MTYPE: i32 = 3;

    fn numbered(mtype: i32, id: u64) -> Message {
        let mut m = msg(mtype);
        m.set_word(1, id);
        m
    }

    impl World {
        fn proc(&mut self, i: u8) -> Option<usize> {
            let i = i as usize % self.procs.len();
            self.procs[i].alive.then_some(i)
        }

        fn request(&mut self, i: u8, req: LocalRequest) {
            if let Some(i) = self.proc(i) {
                self.request_at(i, req);
            }
        }

        /// Process `i` sends `req`, unless it is still waiting for a response.
        fn request_at(&mut self, i: usize, req: LocalRequest) {
            if self.procs[i].pending {
                return;
            }
            self.procs[i].call = match req {
                LocalRequest::Send { msg, .. } => Call::Send { id: msg.word(1) },
                LocalRequest::SendRec { msg, dst, .. } => Call::SendRec {
                    id: msg.word(1),
                    dst,
                },
                LocalRequest::Receive { src, .. } => Call::Receive { src },
                _ => Call::Other,
            };
            if let LocalRequest::Send { dst, msg, .. } | LocalRequest::SendRec { dst, msg, .. } =
                req
            {
                self.sent_by.insert(msg.word(1), (i, dst));
            }
            self.procs[i].pending = true;
            let p = self.procs[i].p;
            self.s.call(p, req);
        }

        /// A new numbered message.
        fn message(&mut self, mtype: i32) -> Message {
            self.next_id += 1;
            numbered(mtype, self.next_id)
        }

        /// Process `p` replies to `dst`, with the number of the request it answers.
        fn reply_at(&mut self, i: usize, dst: Ep) {
            if self.procs[i].pending {
                return;
            }
            let id = self.procs[i].owed.remove(&dst).unwrap_or(0);
            self.request_at(
                i,
                LocalRequest::Reply {
                    dst,
                    msg: numbered(REPLY_MTYPE, id),
                },
            );
        }

        fn disconnect(&mut self, i: usize) {
            self.procs[i].alive = false;
            let p = self.procs[i].p;
            self.s.disconnect(p);
        }

        /// Accounts every response and closes what must be closed, until nothing moves.
        /// Also checks that no message is taken twice, that a send completes only once its
        /// message was taken, and that a sendrec gets the reply to its own request.
        fn check(&mut self) {
            loop {
                let responses = self.s.take_responses();
                for m in responses.values().flatten().filter_map(|r| match r {
                    LocalResponse::Msg(m) => Some(m),
                    _ => None,
                }) {
                    if m.mtype == SEND_MTYPE || m.mtype == SENDREC_MTYPE {
                        let id = m.word(1);
                        assert!(self.received.insert(id), "message {id} taken twice");
                        let pair = self.sent_by[&id];
                        let last = self.last_taken.insert(pair, id).unwrap_or(0);
                        assert!(
                            last < id,
                            "message {id} of (process, dst) {pair:?} taken after the later {last}"
                        );
                    }
                }
                for (p, resps) in responses {
                    let pr = self
                        .procs
                        .iter_mut()
                        .find(|x| x.p == p)
                        .expect("a response to a known process");
                    for r in resps {
                        assert!(pr.alive, "response to a disconnected {p:?}: {r:?}");
                        assert!(pr.pending, "response to {p:?} with no request: {r:?}");
                        pr.pending = false;
                        match (pr.call, &r) {
                            (Call::Send { id }, LocalResponse::Done) => {
                                assert!(
                                    self.received.contains(&id),
                                    "{p:?}: send of {id} done but never taken"
                                )
                            }
                            (Call::Send { .. }, LocalResponse::Msg(_))
                            | (Call::SendRec { .. }, LocalResponse::Done) => {
                                panic!("{p:?}: {:?} answered with {r:?}", pr.call)
                            }
                            (Call::SendRec { id, dst }, LocalResponse::Msg(m)) => {
                                assert_eq!(
                                    (m.mtype, m.word(1), m.source),
                                    (REPLY_MTYPE, id, dst),
                                    "{p:?}: wrong reply to sendrec {id}"
                                )
                            }
                            (Call::Receive { src }, LocalResponse::Msg(m)) => {
                                assert!(
                                    src.accepts(m.source),
                                    "{p:?}: receive from {src:?} got a message of {}",
                                    m.source
                                );
                                if m.mtype == SENDREC_MTYPE {
                                    pr.owed.insert(m.source, m.word(1));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                let mut close = Vec::new();
                for (n, a) in self.s.take_noted() {
                    match a {
                        Action::Local(LocalAction::Close { conn, .. }) => {
                            let i = self
                                .procs
                                .iter()
                                .position(|x| x.p == P { node: n, conn })
                                .expect("known process");
                            assert!(
                                self.procs[i].intruded,
                                "unexpected close of {:?}",
                                self.procs[i].p
                            );
                            close.push(i);
                        }
                        Action::Directory(DirRequest::Unregister { .. }) => {}
                        other => panic!("unexpected action at node {n}: {other:?}"),
                    }
                }
                if close.is_empty() {
                    return;
                }
                for i in close {
                    if self.procs[i].alive {
                        self.disconnect(i);
                    }
                }
            }
        }

        fn apply(&mut self, step: Step) {
            match step {
                Step::Connect(node) => {
                    let p = self.s.connect(node);
                    self.procs.push(Proc::new(p));
                }
                Step::Bind { p, ep } => self.request(p, bind(DC, ep)),
                Step::Send { p, dst, t } => {
                    let msg = self.message(SEND_MTYPE);
                    self.request(
                        p,
                        LocalRequest::Send {
                            dst,
                            msg,
                            timeout: t,
                        },
                    );
                }
                Step::SendRec { p, dst, t } => {
                    let msg = self.message(SENDREC_MTYPE);
                    self.request(
                        p,
                        LocalRequest::SendRec {
                            dst,
                            msg,
                            timeout: t,
                        },
                    );
                }
                Step::Receive { p, src, t } => {
                    self.request(p, recv(src.map_or(Source::Any, Source::Ep), t))
                }
                Step::Reply { p, dst: Some(dst) } => {
                    if let Some(i) = self.proc(p) {
                        self.reply_at(i, dst);
                    }
                }
                Step::Reply { p, dst: None } => {
                    let servers: Vec<usize> = (0..self.procs.len())
                        .filter(|&i| self.procs[i].alive && !self.procs[i].owed.is_empty())
                        .collect();
                    if servers.is_empty() {
                        return;
                    }
                    let i = servers[p as usize % servers.len()];
                    let dst = *self.procs[i].owed.keys().next().expect("filtered");
                    self.reply_at(i, dst);
                }
                Step::Notify { p, dst, value } => self.request(p, notify(dst, value)),
                Step::WaitForBind { p, ep, t } => self.request(p, wait_bind(ep, t)),
                Step::Vcopy { p, src, dst, t } => self.request(p, vcopy(src, dst, 64, t)),
                Step::Unbind(p) => self.request(p, LocalRequest::Unbind),
                Step::Intrude(i) => {
                    let Some(i) = self.proc(i) else { return };
                    if self.procs[i].pending {
                        self.procs[i].intruded = true;
                    }
                    self.procs[i].pending = true;
                    let p = self.procs[i].p;
                    self.s.call(p, LocalRequest::GetEp);
                }
                Step::Disconnect(i) => {
                    if let Some(i) = self.proc(i) {
                        self.disconnect(i);
                    }
                }
                Step::LinkDown(a, b) => {
                    if a != b && self.s.is_up(a, b) {
                        self.s.link_down(a, b);
                    }
                }
                Step::LinkUp(a, b) => {
                    if a != b && !self.s.is_up(a, b) {
                        self.s.link_up(a, b);
                    }
                }
                Step::Advance(ms) => self.s.advance_ms(ms),
                Step::Deliver(n) => {
                    for _ in 0..n % 8 {
                        self.s.deliver_one();
                        self.s.pump();
                    }
                }
            }
            self.check();
        }
    }

    fn run(steps: Vec<Step>) {
        let mut s = cluster();
        s.auto_route = false;
        s.auto_memory = true;
        let mut w = World {
            s,
            procs: Vec::new(),
            next_id: 0,
            received: BTreeSet::new(),
            sent_by: BTreeMap::new(),
            last_taken: BTreeMap::new(),
        };
        // Two bound processes per node to start with.
        for (k, node) in [1, 1, 2, 2, 3, 3].into_iter().enumerate() {
            let p = w.s.connect(node);
            w.procs.push(Proc::new(p));
            w.request_at(k, bind(DC, k as Ep));
            w.s.deliver_all();
            w.check();
        }
        for step in steps {
            w.apply(step);
        }
        // Everything in flight arrives, every timer fires: every call has ended.
        w.s.auto_route = true;
        w.s.deliver_all();
        for _ in 0..10 {
            w.s.advance_ms(600_000);
            w.check();
        }
        for pr in &w.procs {
            assert!(
                !pr.alive || !pr.pending,
                "{:?} never got its response",
                pr.p
            );
        }
        for n in NODES {
            assert_eq!(w.s.core(n).poll_timeout(), None, "node {n} has timers left");
        }
        for i in 0..w.procs.len() {
            if w.procs[i].alive {
                w.disconnect(i);
            }
        }
        w.s.advance_ms(600_000);
        w.check();
        for n in NODES {
            let regs = w.s.core(n).registrations();
            assert!(
                regs.iter()
                    .all(|(_, _, r)| !matches!(r, Registration::Local { .. })),
                "node {n}: {regs:?}"
            );
        }
        assert!(
            w.s.directory().endpoints().is_empty(),
            "directory: {:?}",
            w.s.directory().endpoints()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_traffic_answers_every_request_once(steps in proptest::collection::vec(step(), 1..80)) {
            run(steps);
        }
    }
}
