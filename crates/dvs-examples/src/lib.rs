//! The paper's evaluation programs (docs/ARCHITECTURE.md §7.4), shared code.
//!
//! `migr-client` does `sendrec` to `migr-server` with the address of a fresh buffer; the
//! server fills a block with a pattern derived from the request's sequence number, copies it
//! into the client's buffer with `vcopy` and replies with its request counter. The client
//! checks every block and the counter, so a migration of the server during the run shows up
//! as corrupt, lost or duplicated requests if it is not transparent.
//!
//! Request payload words: [`W_SEQ`], [`W_ADDR`], [`W_SIZE`]. Reply payload words: [`W_SEQ`],
//! [`W_COUNTER`], [`W_SIZE`].
//!
//! [`app`] is the shared code of the realistic example, `app-server` and `app-client`.

pub mod app;

use std::path::PathBuf;
use std::time::Duration;

use m3ipc::{DcId, Endpoint, Ep, Message};

/// `mtype` of a client's request.
pub const MTYPE_REQUEST: i32 = 0x4d01;
/// `mtype` of the server's reply after a successful `vcopy`.
pub const MTYPE_REPLY: i32 = 0x4d02;
/// `mtype` of the server's reply when it could not serve the request (bad size, vcopy
/// failed); word [`W_SEQ`] is the request's sequence number.
pub const MTYPE_REFUSED: i32 = 0x4d03;

/// Payload word holding the client's sequence number (request and reply).
pub const W_SEQ: usize = 0;
/// Request payload word holding the address of the client's buffer.
pub const W_ADDR: usize = 1;
/// Payload word holding the block size in bytes (request and reply).
pub const W_SIZE: usize = 2;
/// Reply payload word holding the server's counter of requests served, this one included.
pub const W_COUNTER: usize = 1;

/// Largest block a request may ask for.
pub const MAX_BLOCK: usize = 16 << 20;

/// Odd multiplier (2^64 / golden ratio) that spreads sequence numbers over all bits.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Word `index` of the block for sequence number `seq`. `seq + 1` so that seq 0 does not give
/// a block that is mostly zeros, which an untouched (zeroed) buffer would match.
pub fn pattern_word(seq: u64, index: u64) -> u64 {
    seq.wrapping_add(1).wrapping_mul(GOLDEN) ^ index
}

/// Fills `block` with the pattern of `seq`: little-endian [`pattern_word`]s, the last one
/// truncated when the length is not a multiple of 8.
pub fn fill_pattern(seq: u64, block: &mut [u8]) {
    let mut words = block.chunks_exact_mut(8);
    let mut index = 0;
    for w in &mut words {
        w.copy_from_slice(&pattern_word(seq, index).to_le_bytes());
        index += 1;
    }
    let rest = words.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&pattern_word(seq, index).to_le_bytes()[..n]);
}

/// Where a block differs from the pattern it should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternMismatch {
    /// Offset of the first differing byte.
    pub offset: usize,
    /// The byte the pattern has there.
    pub expected: u8,
    /// The byte found.
    pub found: u8,
}

impl std::fmt::Display for PatternMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "byte {} is {:#04x}, expected {:#04x}",
            self.offset, self.found, self.expected
        )
    }
}

/// Checks that `block` holds the pattern of `seq` (see [`fill_pattern`]).
pub fn check_pattern(seq: u64, block: &[u8]) -> Result<(), PatternMismatch> {
    let mismatch = |offset: usize, expected: &[u8], found: &[u8]| {
        let i = expected
            .iter()
            .zip(found)
            .position(|(a, b)| a != b)
            .expect("a byte differs");
        PatternMismatch {
            offset: offset + i,
            expected: expected[i],
            found: found[i],
        }
    };
    let mut words = block.chunks_exact(8);
    let mut index = 0;
    for w in &mut words {
        // Compared as u64 so the common (matching) case is one comparison per word.
        let want = pattern_word(seq, index);
        if u64::from_le_bytes(w.try_into().expect("8 bytes")) != want {
            return Err(mismatch(index as usize * 8, &want.to_le_bytes(), w));
        }
        index += 1;
    }
    let rest = words.remainder();
    let want = pattern_word(seq, index).to_le_bytes();
    if rest != &want[..rest.len()] {
        return Err(mismatch(index as usize * 8, &want, rest));
    }
    Ok(())
}

/// A client's request as the server reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The client's sequence number.
    pub seq: u64,
    /// Address of the client's buffer in its own address space.
    pub addr: u64,
    /// Bytes to copy into it.
    pub size: u64,
}

impl Request {
    /// The request message.
    pub fn to_message(&self) -> Message {
        let mut m = Message::new(MTYPE_REQUEST);
        m.set_word(W_SEQ, self.seq)
            .set_word(W_ADDR, self.addr)
            .set_word(W_SIZE, self.size);
        m
    }

    /// Reads a request message (its `mtype` is not checked here).
    pub fn from_message(m: &Message) -> Request {
        Request {
            seq: m.word(W_SEQ),
            addr: m.word(W_ADDR),
            size: m.word(W_SIZE),
        }
    }
}

/// The server's reply for request `seq` after serving `counter` requests in all.
pub fn reply_message(seq: u64, counter: u64, size: u64) -> Message {
    let mut m = Message::new(MTYPE_REPLY);
    m.set_word(W_SEQ, seq)
        .set_word(W_COUNTER, counter)
        .set_word(W_SIZE, size);
    m
}

/// The server's refusal of request `seq`.
pub fn refused_message(seq: u64) -> Message {
    let mut m = Message::new(MTYPE_REFUSED);
    m.set_word(W_SEQ, seq);
    m
}

/// Parses a byte count: a number with an optional suffix K/KiB, M/MiB, G/GiB (powers of 2).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parses a block size for clap: like [`parse_size`], at most [`MAX_BLOCK`].
pub fn parse_block_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n > MAX_BLOCK {
        return Err(format!(
            "block size {n} exceeds the limit of {MAX_BLOCK} bytes"
        ));
    }
    Ok(n)
}

/// Where to bind: flags, each defaulting to the environment that `dvs run` sets.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BindArgs {
    /// DC to bind in [default: $DVS_DC]
    #[arg(long)]
    pub dc: Option<DcId>,
    /// Endpoint number to bind [default: $DVS_EP]
    #[arg(long, allow_negative_numbers = true)]
    pub ep: Option<Ep>,
    /// Path of the node kernel's local socket [default: $DVS_SOCKET]
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl BindArgs {
    /// Connects to the node kernel and binds the endpoint.
    pub fn bind(&self) -> m3ipc::Result<Endpoint> {
        if self.dc.is_none() && self.ep.is_none() && self.socket.is_none() {
            return Endpoint::from_env();
        }
        let socket = match &self.socket {
            Some(p) => p.clone(),
            None => PathBuf::from(env_or_flag(m3ipc::ENV_SOCKET, "--socket")?),
        };
        let dc = match self.dc {
            Some(dc) => dc,
            None => parse_env(m3ipc::ENV_DC, "--dc")?,
        };
        let ep = match self.ep {
            Some(ep) => ep,
            None => parse_env(m3ipc::ENV_EP, "--ep")?,
        };
        Endpoint::bind_at(socket, dc, ep)
    }
}

fn env_or_flag(var: &str, flag: &str) -> m3ipc::Result<String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            m3ipc::Error::Env(format!(
                "{flag} not given and environment variable {var} is not set"
            ))
        })
}

fn parse_env<T: std::str::FromStr>(var: &str, flag: &str) -> m3ipc::Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = env_or_flag(var, flag)?;
    v.trim()
        .parse()
        .map_err(|e| m3ipc::Error::Env(format!("environment variable {var}={v:?} is invalid: {e}")))
}

/// How one client iteration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reply and block as expected.
    Ok,
    /// Wrong reply (sequence, size, type) or block content.
    Corrupt(String),
    /// No valid answer: `sendrec` failed or the server refused.
    Lost(String),
    /// The server's counter did not increase: a request was served twice or a reply replayed.
    Duplicated(String),
}

/// The client's running account of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Iterations whose reply and block were right.
    pub ok: u64,
    /// Iterations with a wrong reply or block.
    pub corrupt: u64,
    /// Iterations without a valid answer.
    pub lost: u64,
    /// Iterations where the server's counter did not increase.
    pub duplicated: u64,
    /// Longest single iteration.
    pub max_stall: Duration,
    /// Server counter in the first reply that carried one.
    pub first_counter: Option<u64>,
    /// Highest server counter seen.
    pub last_counter: Option<u64>,
}

impl Tally {
    /// Records the time one iteration took.
    pub fn stall(&mut self, d: Duration) {
        self.max_stall = self.max_stall.max(d);
    }

    /// Records an iteration that got no answer.
    pub fn lost(&mut self, why: String) -> Outcome {
        self.lost += 1;
        Outcome::Lost(why)
    }

    /// Classifies and records the reply `rep` to request `seq` of `size` bytes, whose block
    /// landed in `buf`.
    pub fn reply(&mut self, seq: u64, size: usize, rep: &Message, buf: &[u8]) -> Outcome {
        if rep.mtype == MTYPE_REFUSED {
            return self.lost(format!(
                "server refused request {} (sent {seq})",
                rep.word(W_SEQ)
            ));
        }
        if rep.mtype != MTYPE_REPLY {
            self.corrupt += 1;
            return Outcome::Corrupt(format!(
                "reply of type {:#x} from ep {}",
                rep.mtype, rep.source
            ));
        }
        let counter = rep.word(W_COUNTER);
        // A counter that does not move forward means the server state went back (a restored
        // checkpoint served the request again) or an old reply was delivered twice.
        if let Some(last) = self.last_counter {
            if counter <= last {
                self.duplicated += 1;
                return Outcome::Duplicated(format!(
                    "server counter {counter} after {last} (seq {seq})"
                ));
            }
        }
        self.first_counter.get_or_insert(counter);
        self.last_counter = Some(counter);
        let problem = if rep.word(W_SEQ) != seq {
            Some(format!(
                "reply for seq {} to request {seq}",
                rep.word(W_SEQ)
            ))
        } else if rep.word(W_SIZE) != size as u64 {
            Some(format!(
                "reply for {} bytes to a request of {size} (seq {seq})",
                rep.word(W_SIZE)
            ))
        } else {
            check_pattern(seq, buf)
                .err()
                .map(|m| format!("block of seq {seq}: {m}"))
        };
        match problem {
            Some(p) => {
                self.corrupt += 1;
                Outcome::Corrupt(p)
            }
            None => {
                self.ok += 1;
                Outcome::Ok
            }
        }
    }

    /// The final line, e.g. `1000 ok, 0 corrupt, 0 lost, 0 duplicated in 0.41 s (max stall
    /// 3.2 ms, server counter 1..1000)`.
    pub fn summary(&self, elapsed: Duration) -> String {
        let counters = match (self.first_counter, self.last_counter) {
            (Some(a), Some(b)) => format!("{a}..{b}"),
            _ => "none".to_string(),
        };
        format!(
            "{} ok, {} corrupt, {} lost, {} duplicated in {:.2} s (max stall {:.1} ms, server counter {counters})",
            self.ok,
            self.corrupt,
            self.lost,
            self.duplicated,
            elapsed.as_secs_f64(),
            self.max_stall.as_secs_f64() * 1e3,
        )
    }

    /// The same figures as [`summary`](Self::summary) as a JSON object.
    pub fn to_json(&self, elapsed: Duration) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok,
            "corrupt": self.corrupt,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "seconds": elapsed.as_secs_f64(),
            "max_stall_ms": self.max_stall.as_secs_f64() * 1e3,
            "first_counter": self.first_counter,
            "last_counter": self.last_counter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seq: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        fill_pattern(seq, &mut b);
        b
    }

    #[test]
    fn pattern_round_trips_for_odd_lengths() {
        for len in [0, 1, 7, 8, 9, 4096, 4099] {
            let b = block(5, len);
            assert_eq!(check_pattern(5, &b), Ok(()), "len {len}");
        }
    }

    #[test]
    fn pattern_detects_a_flipped_byte_anywhere() {
        let b = block(3, 1003);
        for pos in [0, 7, 8, 500, 999, 1002] {
            let mut c = b.clone();
            c[pos] ^= 0x10;
            let m = check_pattern(3, &c).unwrap_err();
            assert_eq!(m.offset, pos);
            assert_eq!(m.found, m.expected ^ 0x10);
        }
    }

    #[test]
    fn pattern_detects_the_wrong_sequence_and_an_untouched_buffer() {
        let b = block(41, 64);
        assert!(check_pattern(42, &b).is_err());
        assert!(check_pattern(40, &b).is_err());
        // Only seq u64::MAX (never used: clients count from 1) has a mostly-zero block.
        for seq in [0, 1, 1 << 40, u64::MAX - 1] {
            assert!(
                check_pattern(seq, &[0u8; 3]).is_err(),
                "zeroed buffer passes for seq {seq}"
            );
        }
    }

    #[test]
    fn request_and_reply_words() {
        let r = Request {
            seq: 9,
            addr: 0x7fff_0000,
            size: 4096,
        };
        let m = r.to_message();
        assert_eq!(m.mtype, MTYPE_REQUEST);
        assert_eq!(Request::from_message(&m), r);
        let rep = reply_message(9, 33, 4096);
        assert_eq!(
            (
                rep.mtype,
                rep.word(W_SEQ),
                rep.word(W_COUNTER),
                rep.word(W_SIZE)
            ),
            (MTYPE_REPLY, 9, 33, 4096)
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1x").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_block_size("16M"), Ok(MAX_BLOCK));
        assert!(parse_block_size("17M").is_err());
    }

    #[test]
    fn tally_classifies_replies() {
        let mut t = Tally::default();
        let b1 = block(1, 100);
        assert_eq!(t.reply(1, 100, &reply_message(1, 5, 100), &b1), Outcome::Ok);
        // Wrong block (the one of another sequence).
        let b2 = block(1, 100);
        assert!(matches!(
            t.reply(2, 100, &reply_message(2, 6, 100), &b2),
            Outcome::Corrupt(_)
        ));
        // Reply for another sequence.
        let b3 = block(3, 100);
        assert!(matches!(
            t.reply(3, 100, &reply_message(4, 7, 100), &b3),
            Outcome::Corrupt(_)
        ));
        // Counter repeats: served twice.
        let b4 = block(4, 100);
        assert!(matches!(
            t.reply(4, 100, &reply_message(4, 7, 100), &b4),
            Outcome::Duplicated(_)
        ));
        // Counter goes back.
        assert!(matches!(
            t.reply(4, 100, &reply_message(4, 2, 100), &b4),
            Outcome::Duplicated(_)
        ));
        assert!(matches!(
            t.reply(5, 100, &refused_message(5), &[]),
            Outcome::Lost(_)
        ));
        assert!(matches!(t.lost("timed out".into()), Outcome::Lost(_)));
        // Gaps in the counter are fine (requests of a dead client were served).
        let b6 = block(6, 100);
        assert_eq!(
            t.reply(6, 100, &reply_message(6, 20, 100), &b6),
            Outcome::Ok
        );
        assert_eq!((t.ok, t.corrupt, t.lost, t.duplicated), (2, 2, 2, 2));
        assert_eq!((t.first_counter, t.last_counter), (Some(5), Some(20)));
    }

    #[test]
    fn summary_line_shape() {
        let t = Tally {
            ok: 1000,
            max_stall: Duration::from_micros(3200),
            first_counter: Some(1),
            last_counter: Some(1000),
            ..Tally::default()
        };
        assert_eq!(
            t.summary(Duration::from_millis(410)),
            "1000 ok, 0 corrupt, 0 lost, 0 duplicated in 0.41 s (max stall 3.2 ms, server counter 1..1000)"
        );
        let j = t.to_json(Duration::from_millis(410));
        assert_eq!(j["ok"], 1000);
        assert_eq!(j["first_counter"], 1);
        assert_eq!(j["last_counter"], 1000);
        assert_eq!(j["duplicated"], 0);
        assert!((j["max_stall_ms"].as_f64().unwrap() - 3.2).abs() < 1e-9);
        assert!(Tally::default()
            .summary(Duration::ZERO)
            .ends_with("server counter none)"));
    }
}
