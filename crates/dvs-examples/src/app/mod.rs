//! The realistic migration example (`app-server`, `app-client`): shared protocol, cache,
//! log chain and the client's checks.
//!
//! `app-server` is shaped like a real server: one thread owns the endpoint and receives, a
//! pool of worker threads computes the answers, a helper child process (connected by pipes)
//! contributes a value to every answer, a timer thread ticks, an in-memory cache of
//! configurable size is filled deterministically at start, and every served request and
//! every tick is appended to `app.log` in the working directory as one line of a hash chain.
//!
//! Everything an answer holds can be recomputed by the client from its request alone (the
//! cache content from the key, the helper's value from the key and the log position, the
//! log line's hash from the previous hash the answer carries), so a migration that loses,
//! repeats or alters anything shows up in the client's tally; `app-client --verify-log`
//! checks the whole log file afterwards.
//!
//! Request words: [`W_SEQ`], [`W_KEY`], [`W_VAL`]. Answer words: [`W_SEQ`], [`W_LOG_SEQ`],
//! [`W_PREV_HASH`], [`W_HASH`] and three result words from [`W_RESULT`] on.

pub mod cache;
pub mod check;
pub mod log;

use std::collections::HashMap;

use m3ipc::{Ep, Message};

pub use cache::{helper_value, lookup_checksum, Cache};
pub use check::{AppTally, ClientCheck};
pub use log::{chain_hash, verify_log, LogDefect, LogSummary, GENESIS};

/// `mtype` of a lookup: the checksum of the cache slice that the key selects.
pub const MT_LOOKUP: i32 = 0x4101;
/// `mtype` of a put: stores a value under (client, key), answers the previous one.
pub const MT_PUT: i32 = 0x4102;
/// `mtype` of a get: the value stored under (client, key), 0 if none.
pub const MT_GET: i32 = 0x4103;
/// `mtype` of a status request: threads, helper pid, cache size and ticks.
pub const MT_STATUS: i32 = 0x4104;
/// `mtype` of an answer that was served and logged.
pub const MT_ANSWER: i32 = 0x4181;
/// `mtype` of a refusal (unknown request, or the server could not serve it: helper lost,
/// log not writable); word [`W_SEQ`] is the request's sequence number.
pub const MT_REFUSED: i32 = 0x4182;

/// Payload word with the client's sequence number (request and answer).
pub const W_SEQ: usize = 0;
/// Request payload word with the key.
pub const W_KEY: usize = 1;
/// Request payload word with the value of a put.
pub const W_VAL: usize = 2;
/// Answer payload word with the log sequence number of the request's line.
pub const W_LOG_SEQ: usize = 1;
/// Answer payload word with the hash of the log line before the request's line.
pub const W_PREV_HASH: usize = 2;
/// Answer payload word with the hash of the request's log line.
pub const W_HASH: usize = 3;
/// First of the three result words of an answer (what they mean depends on the request).
pub const W_RESULT: usize = 4;

/// The kinds of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`MT_LOOKUP`].
    Lookup,
    /// [`MT_PUT`].
    Put,
    /// [`MT_GET`].
    Get,
    /// [`MT_STATUS`].
    Status,
}

impl Op {
    /// Every kind, in `mtype` order.
    pub const ALL: [Op; 4] = [Op::Lookup, Op::Put, Op::Get, Op::Status];

    /// The request's `mtype`.
    pub fn mtype(self) -> i32 {
        match self {
            Op::Lookup => MT_LOOKUP,
            Op::Put => MT_PUT,
            Op::Get => MT_GET,
            Op::Status => MT_STATUS,
        }
    }

    /// The kind of a request `mtype`, if it is one.
    pub fn from_mtype(mtype: i32) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.mtype() == mtype)
    }

    /// The name in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Put => "put",
            Op::Get => "get",
            Op::Status => "status",
        }
    }

    /// The kind a log line's name stands for.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// A request as the client sends it and the server reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppRequest {
    /// What is asked.
    pub op: Op,
    /// The client's sequence number.
    pub seq: u64,
    /// The key (lookup, put, get).
    pub key: u64,
    /// The value (put).
    pub val: u64,
}

impl AppRequest {
    /// The request message.
    pub fn to_message(&self) -> Message {
        let mut m = Message::new(self.op.mtype());
        m.set_word(W_SEQ, self.seq)
            .set_word(W_KEY, self.key)
            .set_word(W_VAL, self.val);
        m
    }

    /// Reads a request, `None` if its `mtype` is not a request kind.
    pub fn from_message(m: &Message) -> Option<AppRequest> {
        Some(AppRequest {
            op: Op::from_mtype(m.mtype)?,
            seq: m.word(W_SEQ),
            key: m.word(W_KEY),
            val: m.word(W_VAL),
        })
    }
}

/// A served request's answer: where its line sits in the log chain and three result words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The client's sequence number, echoed.
    pub seq: u64,
    /// The log sequence number of the request's line.
    pub log_seq: u64,
    /// The hash of the line before it ([`GENESIS`] for the first line).
    pub prev_hash: u64,
    /// The hash of the request's line.
    pub hash: u64,
    /// The results: lookup `[checksum, helper, 0]`, put `[previous, helper, 0]`, get
    /// `[value, helper, 0]`, status [`Status::to_words`].
    pub result: [u64; 3],
}

impl Answer {
    /// The answer message.
    pub fn to_message(&self) -> Message {
        let mut m = Message::new(MT_ANSWER);
        m.set_word(W_SEQ, self.seq)
            .set_word(W_LOG_SEQ, self.log_seq)
            .set_word(W_PREV_HASH, self.prev_hash)
            .set_word(W_HASH, self.hash);
        for (i, w) in self.result.iter().enumerate() {
            m.set_word(W_RESULT + i, *w);
        }
        m
    }

    /// Reads an answer message (its `mtype` is not checked here).
    pub fn from_message(m: &Message) -> Answer {
        Answer {
            seq: m.word(W_SEQ),
            log_seq: m.word(W_LOG_SEQ),
            prev_hash: m.word(W_PREV_HASH),
            hash: m.word(W_HASH),
            result: [m.word(W_RESULT), m.word(W_RESULT + 1), m.word(W_RESULT + 2)],
        }
    }
}

/// The refusal of request `seq`.
pub fn refused(seq: u64) -> Message {
    let mut m = Message::new(MT_REFUSED);
    m.set_word(W_SEQ, seq);
    m
}

/// What a status request reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Worker threads in the pool (configured).
    pub workers: u16,
    /// Threads of the server process, counted in `/proc/self/task` while answering.
    pub threads: u16,
    /// The helper child's pid inside the server's pid namespace, as the helper reports it.
    pub helper_pid: u32,
    /// Size of the cache in bytes.
    pub cache_bytes: u64,
    /// Timer ticks so far.
    pub ticks: u64,
}

impl Status {
    /// The three result words: `workers << 48 | threads << 32 | helper_pid`, cache bytes,
    /// ticks.
    pub fn to_words(&self) -> [u64; 3] {
        [
            (self.workers as u64) << 48 | (self.threads as u64) << 32 | self.helper_pid as u64,
            self.cache_bytes,
            self.ticks,
        ]
    }

    /// Reads the result words of a status answer.
    pub fn from_words(w: [u64; 3]) -> Status {
        Status {
            workers: (w[0] >> 48) as u16,
            threads: (w[0] >> 32) as u16,
            helper_pid: w[0] as u32,
            cache_bytes: w[1],
            ticks: w[2],
        }
    }

    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "workers": self.workers,
            "threads": self.threads,
            "helper_pid": self.helper_pid,
            "cache_bytes": self.cache_bytes,
            "ticks": self.ticks,
        })
    }
}

/// The log line body (without its hash) of request `req` from client `ep`, served as log
/// line `log_seq` with results `result`. The client rebuilds it to check the answer's hash.
pub fn request_body(log_seq: u64, ep: Ep, req: &AppRequest, result: &[u64; 3]) -> String {
    format!(
        "{log_seq} {} ep={ep} seq={} key={:x} val={:x} res={:x},{:x},{:x}",
        req.op.name(),
        req.seq,
        req.key,
        req.val,
        result[0],
        result[1],
        result[2]
    )
}

/// The log line body of timer tick number `ticks`, written as log line `log_seq`.
pub fn tick_body(log_seq: u64, ticks: u64) -> String {
    format!("{log_seq} tick t={ticks}")
}

/// The values clients stored with puts, per (client, key).
pub type Store = HashMap<(Ep, u64), u64>;

/// The result words the server answers to request `req` of client `ep`: `helper` is what
/// the helper child computed for it (unused by a status, which is `status`).
pub fn results(
    req: &AppRequest,
    ep: Ep,
    cache: &Cache,
    store: &mut Store,
    helper: u64,
    status: Status,
) -> [u64; 3] {
    match req.op {
        Op::Lookup => [cache.lookup(req.key), helper, 0],
        Op::Put => [store.insert((ep, req.key), req.val).unwrap_or(0), helper, 0],
        Op::Get => [store.get(&(ep, req.key)).copied().unwrap_or(0), helper, 0],
        Op::Status => status.to_words(),
    }
}

/// Odd multiplier (2^64 / golden ratio).
pub(crate) const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit finaliser (splitmix64's): every input bit affects every output bit.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for op in Op::ALL {
            let r = AppRequest {
                op,
                seq: 7,
                key: u64::MAX - 3,
                val: 42,
            };
            let m = r.to_message();
            assert_eq!(AppRequest::from_message(&m), Some(r));
            assert_eq!(Op::from_name(op.name()), Some(op));
        }
        assert_eq!(AppRequest::from_message(&Message::new(0x4d01)), None);
    }

    #[test]
    fn answers_and_status_round_trip() {
        let s = Status {
            workers: 4,
            threads: 6,
            helper_pid: 2,
            cache_bytes: 16 << 20,
            ticks: 99,
        };
        assert_eq!(Status::from_words(s.to_words()), s);
        let a = Answer {
            seq: 3,
            log_seq: 10,
            prev_hash: 11,
            hash: 12,
            result: s.to_words(),
        };
        let m = a.to_message();
        assert_eq!(m.mtype, MT_ANSWER);
        assert_eq!(Answer::from_message(&m), a);
        assert_eq!(refused(5).word(W_SEQ), 5);
    }

    #[test]
    fn bodies_name_every_field() {
        let r = AppRequest {
            op: Op::Put,
            seq: 9,
            key: 255,
            val: 16,
        };
        assert_eq!(
            request_body(4, 2, &r, &[1, 2, 3]),
            "4 put ep=2 seq=9 key=ff val=10 res=1,2,3"
        );
        assert_eq!(tick_body(5, 1), "5 tick t=1");
    }
}
