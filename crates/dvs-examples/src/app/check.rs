//! The client's side: which request to send next and the exact check of every answer.
//!
//! Each answer is checked on its own (the result recomputed from the request, the log
//! line's hash recomputed from the line the client rebuilds and the previous hash the
//! answer carries) and against the answers before it: log positions only go forward, and
//! when an answer's line directly follows this client's previous one, its previous hash must
//! be that answer's hash. With another client calling the same server the positions
//! interleave, which is fine; a server that went back (a request served twice by a restored
//! copy, a log line written twice) is not.

use std::collections::HashMap;
use std::time::Duration;

use m3ipc::{Ep, Message};

use super::{
    cache::lookup_checksum, chain_hash, helper_value, mix64, request_body, Answer, AppRequest, Op,
    Status, MT_ANSWER, MT_REFUSED, W_SEQ,
};
use crate::Outcome;

/// Keys a client puts and gets (few, so that gets find values put before).
pub const STORE_KEYS: u64 = 8;

/// The client's running account.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppTally {
    /// Answers that checked out.
    pub ok: u64,
    /// Answers with a wrong result, hash or status.
    pub corrupt: u64,
    /// Requests without a valid answer.
    pub lost: u64,
    /// Answers whose log position did not move forward.
    pub duplicated: u64,
    /// Answers whose line directly followed this client's previous answer's line, and whose
    /// previous hash was that line's hash.
    pub chained: u64,
    /// Longest single request.
    pub max_stall: Duration,
    /// Log position of the first answer.
    pub first_log_seq: Option<u64>,
    /// Highest log position answered.
    pub last_log_seq: Option<u64>,
}

/// The checks of one client run.
#[derive(Debug, Clone)]
pub struct ClientCheck {
    /// This client's endpoint (the server logs it in each line).
    me: Ep,
    /// The server's cache size, from the first status answer.
    cache_bytes: Option<u64>,
    /// What this client stored per key, for the keys whose value it knows: not before its
    /// first put (an earlier client with the same endpoint may have left a value), nor after
    /// a put whose fate is unknown.
    store: HashMap<u64, u64>,
    /// Log position and hash of the last answer.
    last: Option<(u64, u64)>,
    /// The first status answer.
    first_status: Option<Status>,
    /// The latest status answer.
    last_status: Option<Status>,
    /// The account so far.
    pub tally: AppTally,
}

impl ClientCheck {
    /// The checks of client `me`.
    pub fn new(me: Ep) -> ClientCheck {
        ClientCheck {
            me,
            cache_bytes: None,
            store: HashMap::new(),
            last: None,
            first_status: None,
            last_status: None,
            tally: AppTally::default(),
        }
    }

    /// The request with sequence number `seq` (from 1): a status every 16 requests (and
    /// until the cache size is known), otherwise puts, gets and lookups in turn.
    pub fn request(&self, seq: u64) -> AppRequest {
        let salt = (self.me as u32 as u64) << 40;
        let (op, key, val) = if self.cache_bytes.is_none() || seq % 16 == 1 {
            (Op::Status, 0, 0)
        } else if seq % 4 == 0 {
            (Op::Put, (seq / 4) % STORE_KEYS, mix64(seq ^ salt) | 1)
        } else if seq % 4 == 2 {
            (Op::Get, mix64(seq) % STORE_KEYS, 0)
        } else {
            (Op::Lookup, mix64(seq ^ salt), 0)
        };
        AppRequest { op, seq, key, val }
    }

    /// Records the time one request took.
    pub fn stall(&mut self, d: Duration) {
        self.tally.max_stall = self.tally.max_stall.max(d);
    }

    /// Records a request that got no answer.
    pub fn lost(&mut self, req: &AppRequest, why: String) -> Outcome {
        if req.op == Op::Put {
            // It may or may not have been applied: stop checking this key until a put
            // with a known outcome.
            self.store.remove(&req.key);
        }
        self.tally.lost += 1;
        Outcome::Lost(why)
    }

    fn corrupt(&mut self, why: String) -> Outcome {
        self.tally.corrupt += 1;
        Outcome::Corrupt(why)
    }

    /// Checks the reply `rep` to request `req` and records the outcome.
    pub fn check(&mut self, req: &AppRequest, rep: &Message) -> Outcome {
        let seq = req.seq;
        if rep.mtype == MT_REFUSED {
            let why = format!("server refused request {} (sent {seq})", rep.word(W_SEQ));
            return self.lost(req, why);
        }
        if rep.mtype != MT_ANSWER {
            let why = format!("reply of type {:#x} to request {seq}", rep.mtype);
            return self.corrupt(why);
        }
        let a = Answer::from_message(rep);
        if a.seq != seq {
            return self.corrupt(format!("answer for request {} to request {seq}", a.seq));
        }
        if let Some((last_seq, last_hash)) = self.last {
            if a.log_seq <= last_seq {
                self.tally.duplicated += 1;
                return Outcome::Duplicated(format!(
                    "request {seq} logged as line {} after line {last_seq}",
                    a.log_seq
                ));
            }
            if a.log_seq == last_seq + 1 {
                if a.prev_hash != last_hash {
                    self.last = Some((a.log_seq, a.hash));
                    return self.corrupt(format!(
                        "request {seq}: line {} does not follow line {last_seq} \
                         (previous hash {:016x}, that line's {last_hash:016x})",
                        a.log_seq, a.prev_hash
                    ));
                }
                self.tally.chained += 1;
            }
        }
        self.last = Some((a.log_seq, a.hash));
        self.tally.first_log_seq.get_or_insert(a.log_seq);
        self.tally.last_log_seq = Some(a.log_seq);
        let body = request_body(a.log_seq, self.me, req, &a.result);
        if chain_hash(a.prev_hash, &body) != a.hash {
            return self.corrupt(format!(
                "request {seq}: hash {:016x} does not seal line {body:?}",
                a.hash
            ));
        }
        match self.check_result(req, &a) {
            Some(why) => self.corrupt(why),
            None => {
                self.tally.ok += 1;
                Outcome::Ok
            }
        }
    }

    /// What is wrong with the result words of an answer to `req`, if anything.
    fn check_result(&mut self, req: &AppRequest, a: &Answer) -> Option<String> {
        let seq = req.seq;
        let [r0, r1, _] = a.result;
        let helper = helper_value(req.key, a.log_seq);
        if req.op != Op::Status && r1 != helper {
            return Some(format!(
                "request {seq}: helper value {r1:#x}, expected {helper:#x} (helper lost?)"
            ));
        }
        match req.op {
            Op::Lookup => {
                let bytes = self.cache_bytes?;
                let want = lookup_checksum(bytes, req.key);
                (r0 != want).then(|| {
                    format!(
                        "request {seq}: lookup of key {:#x} answered {r0:#x}, expected {want:#x}",
                        req.key
                    )
                })
            }
            Op::Put => {
                let known = self.store.insert(req.key, req.val);
                known.filter(|want| r0 != *want).map(|want| {
                    format!(
                        "request {seq}: put of key {} found {r0:#x}, this client stored {want:#x}",
                        req.key
                    )
                })
            }
            Op::Get => {
                let known = self.store.get(&req.key).copied();
                known.filter(|want| r0 != *want).map(|want| {
                    format!(
                        "request {seq}: get of key {} answered {r0:#x}, this client stored {want:#x}",
                        req.key
                    )
                })
            }
            Op::Status => self.check_status(seq, Status::from_words(a.result)),
        }
    }

    /// A status must agree with the first one (same pool, threads, helper, cache) and its
    /// ticks must not go back.
    fn check_status(&mut self, seq: u64, s: Status) -> Option<String> {
        let previous = self.last_status.replace(s);
        let Some(first) = self.first_status else {
            self.first_status = Some(s);
            self.cache_bytes = Some(s.cache_bytes);
            return None;
        };
        let same = |x: &Status| (x.workers, x.threads, x.helper_pid, x.cache_bytes);
        if same(&s) != same(&first) {
            return Some(format!(
                "request {seq}: status {s:?} differs from the first {first:?}"
            ));
        }
        match previous {
            Some(p) if s.ticks < p.ticks => Some(format!(
                "request {seq}: ticks went back from {} to {}",
                p.ticks, s.ticks
            )),
            _ => None,
        }
    }

    /// The final line, e.g. `1000 ok, 0 corrupt, 0 lost, 0 duplicated in 0.80 s (max stall
    /// 2.0 ms, log lines 3..2010, 990 chained)`.
    pub fn summary(&self, elapsed: Duration) -> String {
        let t = &self.tally;
        let lines = match (t.first_log_seq, t.last_log_seq) {
            (Some(a), Some(b)) => format!("{a}..{b}"),
            _ => "none".to_string(),
        };
        format!(
            "{} ok, {} corrupt, {} lost, {} duplicated in {:.2} s (max stall {:.1} ms, log lines {lines}, {} chained)",
            t.ok,
            t.corrupt,
            t.lost,
            t.duplicated,
            elapsed.as_secs_f64(),
            t.max_stall.as_secs_f64() * 1e3,
            t.chained
        )
    }

    /// The same figures as a JSON object, with the first and the last status answers.
    pub fn to_json(&self, elapsed: Duration) -> serde_json::Value {
        let t = &self.tally;
        serde_json::json!({
            "ok": t.ok,
            "corrupt": t.corrupt,
            "lost": t.lost,
            "duplicated": t.duplicated,
            "chained": t.chained,
            "seconds": elapsed.as_secs_f64(),
            "max_stall_ms": t.max_stall.as_secs_f64() * 1e3,
            "first_log_seq": t.first_log_seq,
            "last_log_seq": t.last_log_seq,
            "first_status": self.first_status.map(|s| s.to_json()),
            "last_status": self.last_status.map(|s| s.to_json()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{log::Chain, results, Cache, Store};
    use super::*;

    /// The server's logic without threads, pipes or files.
    struct FakeServer {
        chain: Chain,
        cache: Cache,
        store: Store,
        ticks: u64,
    }

    impl FakeServer {
        fn new() -> FakeServer {
            FakeServer {
                chain: Chain::default(),
                cache: Cache::new(1),
                store: Store::new(),
                ticks: 0,
            }
        }

        fn status(&self) -> Status {
            Status {
                workers: 4,
                threads: 6,
                helper_pid: 2,
                cache_bytes: self.cache.bytes(),
                ticks: self.ticks,
            }
        }

        fn serve(&mut self, ep: Ep, req: &AppRequest) -> Message {
            let n = self.chain.next_seq();
            let helper = helper_value(req.key, n);
            let status = self.status();
            let result = results(req, ep, &self.cache, &mut self.store, helper, status);
            let sealed = self.chain.seal(&request_body(n, ep, req, &result));
            Answer {
                seq: req.seq,
                log_seq: n,
                prev_hash: sealed.prev_hash,
                hash: sealed.hash,
                result,
            }
            .to_message()
        }

        fn tick(&mut self) {
            self.ticks += 1;
            let n = self.chain.next_seq();
            self.chain.seal(&super::super::tick_body(n, self.ticks));
        }
    }

    /// Runs `n` requests of client 2 (and of client 3 taking turns with it if `two`), with
    /// ticks now and then, and returns both checks.
    fn run_with(n: u64, two: bool) -> (FakeServer, ClientCheck, ClientCheck) {
        let mut s = FakeServer::new();
        let mut a = ClientCheck::new(2);
        let mut b = ClientCheck::new(3);
        for seq in 1..=n {
            let clients = if two {
                vec![&mut a, &mut b]
            } else {
                vec![&mut a]
            };
            for c in clients {
                let req = c.request(seq);
                let rep = s.serve(c.me, &req);
                assert_eq!(c.check(&req, &rep), Outcome::Ok, "seq {seq}");
            }
            if seq % 7 == 0 {
                s.tick();
            }
        }
        (s, a, b)
    }

    fn run(n: u64) -> (FakeServer, ClientCheck, ClientCheck) {
        run_with(n, false)
    }

    #[test]
    fn two_interleaved_clients_check_out() {
        let (_, a, b) = run_with(100, true);
        for c in [&a, &b] {
            assert_eq!((c.tally.ok, c.tally.corrupt, c.tally.lost), (100, 0, 0));
            assert_eq!(c.tally.duplicated, 0);
            // The other client's lines always come between.
            assert_eq!(c.tally.chained, 0);
        }
        // Alone, a client's lines follow each other, except after a tick.
        let (_, alone, _) = run(100);
        assert_eq!(alone.tally.chained, 99 - 100 / 7, "{:?}", alone.tally);
        let kinds: Vec<Op> = (1..=16).map(|s| a.request(s).op).collect();
        for op in Op::ALL {
            assert!(kinds.contains(&op), "{op:?} never sent");
        }
        let j = a.to_json(Duration::from_millis(5));
        assert_eq!(j["ok"], 100);
        assert_eq!(j["last_status"]["helper_pid"], 2);
    }

    #[test]
    fn values_left_by_an_earlier_client_with_the_same_endpoint_are_not_errors() {
        let (mut s, _, _) = run(40);
        let mut again = ClientCheck::new(2);
        for seq in 1..=40 {
            let req = again.request(seq);
            let rep = s.serve(2, &req);
            assert_eq!(again.check(&req, &rep), Outcome::Ok, "seq {seq}");
        }
    }

    #[test]
    fn a_replayed_answer_is_a_duplicate() {
        let (mut s, mut a, _) = run(10);
        let req = a.request(11);
        let rep = s.serve(2, &req);
        assert_eq!(a.check(&req, &rep), Outcome::Ok);
        assert!(matches!(a.check(&req, &rep), Outcome::Duplicated(_)));
        // A server restored from an older state answers from an older log position.
        let mut old = FakeServer::new();
        let req = a.request(12);
        let rep = old.serve(2, &req);
        assert!(matches!(a.check(&req, &rep), Outcome::Duplicated(_)));
    }

    #[test]
    fn wrong_results_are_corrupt() {
        let (mut s, mut a, _) = run(20);
        // Each kind of damage on a fresh answer, for a lookup (seq 23) and a put (seq 24).
        type Damage = fn(&mut Message);
        let damages: [Damage; 4] = [
            |m| {
                m.set_word(W_RESULT, m.word(W_RESULT) ^ 1);
            },
            |m| {
                m.set_word(W_RESULT + 1, 0);
            },
            |m| {
                m.set_word(W_HASH, m.word(W_HASH) ^ 1);
            },
            |m| {
                m.set_word(W_SEQ, 999);
            },
        ];
        use super::super::{W_HASH, W_RESULT};
        let mut seq = 20;
        for damage in damages {
            for _ in 0..2 {
                seq += 1;
                let req = a.request(seq);
                let mut rep = s.serve(2, &req);
                damage(&mut rep);
                assert!(
                    matches!(a.check(&req, &rep), Outcome::Corrupt(_)),
                    "seq {seq} {:?}",
                    req.op
                );
            }
        }
    }

    #[test]
    fn a_line_lost_between_two_answers_breaks_the_chain() {
        let (mut s, mut a, _) = run(5);
        let req = a.request(6);
        let rep = s.serve(2, &req);
        assert_eq!(a.check(&req, &rep), Outcome::Ok);
        // The server forgets its last line (a log that went back) and writes another one.
        s.chain.last_hash ^= 1;
        let req = a.request(7);
        let rep = s.serve(2, &req);
        assert!(matches!(a.check(&req, &rep), Outcome::Corrupt(why) if why.contains("follow")));
    }

    #[test]
    fn a_status_that_changes_is_corrupt() {
        let (mut s, mut a, _) = run(16);
        let req = a.request(17);
        assert_eq!(req.op, Op::Status);
        s.cache = Cache::new(2);
        let rep = s.serve(2, &req);
        assert!(matches!(a.check(&req, &rep), Outcome::Corrupt(_)));
    }

    #[test]
    fn a_put_without_answer_stops_checking_its_key() {
        let (mut s, mut a, _) = run(3);
        let put = a.request(4);
        assert_eq!(put.op, Op::Put);
        // Served, but the answer never arrives.
        s.serve(2, &put);
        assert!(matches!(a.lost(&put, "timed out".into()), Outcome::Lost(_)));
        // The next put of that key finds a value the client does not know: not an error.
        let next = AppRequest { seq: 5, ..put };
        let rep = s.serve(2, &next);
        assert_eq!(a.check(&next, &rep), Outcome::Ok);
        // From then on the value is known again.
        let get = AppRequest {
            op: Op::Get,
            seq: 6,
            key: put.key,
            val: 0,
        };
        let rep = s.serve(2, &get);
        assert_eq!(a.check(&get, &rep), Outcome::Ok);
        s.store.insert((2, put.key), 77);
        let get = AppRequest { seq: 7, ..get };
        let rep = s.serve(2, &get);
        assert!(matches!(a.check(&get, &rep), Outcome::Corrupt(_)));
        assert_eq!(a.summary(Duration::ZERO).split(',').next(), Some("5 ok"));
    }
}
