//! `app.log`: one line per served request or timer tick, each line sealed by a hash over
//! the previous line's hash and its own body, so a line that is lost, repeated, reordered
//! or altered breaks the chain at a line [`verify_log`] names.
//!
//! A line is `BODY h=HASH`, BODY starting with the line's sequence number (1, 2, ...)
//! followed by the kind (`lookup`, `put`, `get`, `status` or `tick`); see
//! [`request_body`](super::request_body) and [`tick_body`](super::tick_body).

use super::{mix64, Op};

/// The hash before the first line.
pub const GENESIS: u64 = 0x6476_735f_6170_7031;

/// FNV-1a's 64-bit parameters, for hashing the body's bytes.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash of a line with body `body` after a line whose hash is `prev`. It detects
/// accidents (lost, repeated, damaged lines), not forgeries.
pub fn chain_hash(prev: u64, body: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for b in prev.to_le_bytes().iter().chain(body.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix64(h)
}

/// The full line (with its newline) of body `body` sealed with `hash`.
pub fn line(body: &str, hash: u64) -> String {
    format!("{body} h={hash:016x}\n")
}

/// The end of a chain: the last line's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// Sequence number of the last line (0: none yet).
    pub last_seq: u64,
    /// Hash of the last line ([`GENESIS`] if none).
    pub last_hash: u64,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            last_seq: 0,
            last_hash: GENESIS,
        }
    }
}

/// A line sealed by [`Chain::seal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The hash of the line before.
    pub prev_hash: u64,
    /// The line's hash.
    pub hash: u64,
    /// The line, with its newline.
    pub line: String,
}

impl Chain {
    /// The chain a verified log ends with, to append to it.
    pub fn resume(s: &LogSummary) -> Chain {
        Chain {
            last_seq: s.last_seq,
            last_hash: s.last_hash,
        }
    }

    /// The sequence number the next line gets.
    pub fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// Seals `body` (which must start with [`next_seq`](Self::next_seq)) as the next line
    /// and advances the chain.
    pub fn seal(&mut self, body: &str) -> Sealed {
        let prev_hash = self.last_hash;
        let hash = chain_hash(prev_hash, body);
        self.last_seq += 1;
        self.last_hash = hash;
        Sealed {
            prev_hash,
            hash,
            line: line(body, hash),
        }
    }

    /// Undoes the last [`seal`](Self::seal) when its line could not be written, so the
    /// chain still matches the file.
    pub fn unseal(&mut self, s: &Sealed) {
        self.last_seq -= 1;
        self.last_hash = s.prev_hash;
    }
}

/// What a log holds when its chain is intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogSummary {
    /// Lines in all.
    pub lines: u64,
    /// Request lines.
    pub requests: u64,
    /// Tick lines.
    pub ticks: u64,
    /// Sequence number of the last line (0 for an empty log).
    pub last_seq: u64,
    /// Hash of the last line ([`GENESIS`] for an empty log).
    pub last_hash: u64,
}

impl LogSummary {
    /// One line for people, e.g. `app.log: 12 lines (10 requests, 2 ticks), chain intact,
    /// last line 12 h=...`.
    pub fn summary(&self, name: &str) -> String {
        format!(
            "{name}: {} lines ({} requests, {} ticks), chain intact, last line {} h={:016x}",
            self.lines, self.requests, self.ticks, self.last_seq, self.last_hash
        )
    }

    /// The same as a JSON object (`"intact": true`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "intact": true,
            "lines": self.lines,
            "requests": self.requests,
            "ticks": self.ticks,
            "last_seq": self.last_seq,
            "last_hash": format!("{:016x}", self.last_hash),
        })
    }
}

/// The first defect of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDefect {
    /// Its line number in the file (from 1).
    pub line: u64,
    /// What is wrong there.
    pub what: String,
    /// The chain up to the line before, for a summary of the part that is intact.
    pub intact: LogSummary,
}

impl std::fmt::Display for LogDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: {} (the {} lines before are intact)",
            self.line, self.what, self.intact.lines
        )
    }
}

/// Checks a whole log: every line well formed and ended by a newline, sequence numbers
/// from 1 without gap or repeat, every hash sealing the line's body after the previous
/// hash.
pub fn verify_log(text: &str) -> Result<LogSummary, LogDefect> {
    let mut s = LogSummary {
        last_hash: GENESIS,
        ..LogSummary::default()
    };
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let number = i as u64 + 1;
        let defect = |what: String| LogDefect {
            line: number,
            what,
            intact: s,
        };
        let Some(l) = raw.strip_suffix('\n') else {
            return Err(defect(format!("the last line is cut short: {raw:?}")));
        };
        let Some((body, hash)) = l.rsplit_once(" h=") else {
            return Err(defect(format!("no hash in {l:?}")));
        };
        let hash = u64::from_str_radix(hash, 16)
            .ok()
            .filter(|_| hash.len() == 16)
            .ok_or_else(|| defect(format!("bad hash {hash:?}")))?;
        let mut words = body.split(' ');
        let seq: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| defect(format!("no sequence number in {l:?}")))?;
        let want = s.last_seq + 1;
        if seq != want {
            let what = if seq <= s.last_seq {
                format!(
                    "sequence number {seq} again or going back (after {})",
                    s.last_seq
                )
            } else {
                format!(
                    "sequence number {seq}: lines {want}..{} are missing",
                    seq - 1
                )
            };
            return Err(defect(what));
        }
        let expected = chain_hash(s.last_hash, body);
        if hash != expected {
            return Err(defect(format!(
                "hash {hash:016x} does not seal this line after the one before \
                 (expected {expected:016x}): the line or the one before was altered"
            )));
        }
        match words.next() {
            Some("tick") => s.ticks += 1,
            Some(kind) if Op::from_name(kind).is_some() => s.requests += 1,
            other => return Err(defect(format!("unknown line kind {other:?}"))),
        }
        s.lines += 1;
        s.last_seq = seq;
        s.last_hash = hash;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::super::{request_body, tick_body, AppRequest};
    use super::*;

    /// A log of `n` lines, every fourth a tick.
    fn log(n: u64) -> Vec<String> {
        let mut c = Chain::default();
        (1..=n)
            .map(|i| {
                let body = if i % 4 == 0 {
                    tick_body(c.next_seq(), i / 4)
                } else {
                    let r = AppRequest {
                        op: Op::ALL[i as usize % 4],
                        seq: i,
                        key: i * 3,
                        val: i,
                    };
                    request_body(c.next_seq(), 2, &r, &[i, 0, 1])
                };
                c.seal(&body).line
            })
            .collect()
    }

    fn text(lines: &[String]) -> String {
        lines.concat()
    }

    #[test]
    fn an_intact_log_verifies() {
        let lines = log(12);
        let s = verify_log(&text(&lines)).expect("intact");
        assert_eq!((s.lines, s.requests, s.ticks, s.last_seq), (12, 9, 3, 12));
        let empty = verify_log("").expect("an empty log is intact");
        assert_eq!((empty.lines, empty.last_hash), (0, GENESIS));
        // Resuming continues the same chain.
        let mut c = Chain::resume(&verify_log(&text(&lines[..5])).unwrap());
        let body = tick_body(c.next_seq(), 9);
        let mut more = lines[..5].to_vec();
        more.push(c.seal(&body).line);
        assert_eq!(verify_log(&text(&more)).unwrap().lines, 6);
    }

    #[test]
    fn a_removed_line_is_detected() {
        for gone in [0, 5, 10] {
            let mut lines = log(12);
            lines.remove(gone);
            let d = verify_log(&text(&lines)).expect_err("a gap");
            assert_eq!(d.line, gone as u64 + 1, "{d}");
            assert!(d.what.contains("missing"), "{d}");
        }
        // The last line missing is indistinguishable from a shorter log; the clients'
        // answers catch that (their log positions are past the end).
        let mut lines = log(12);
        lines.pop();
        assert_eq!(verify_log(&text(&lines)).unwrap().lines, 11);
    }

    #[test]
    fn a_duplicated_line_is_detected() {
        let mut lines = log(12);
        lines.insert(6, lines[5].clone());
        let d = verify_log(&text(&lines)).expect_err("a repeat");
        assert_eq!(d.line, 7);
        assert!(d.what.contains("again"), "{d}");
        assert_eq!(d.intact.lines, 6);
    }

    #[test]
    fn reordered_lines_are_detected() {
        let mut lines = log(12);
        lines.swap(3, 4);
        let d = verify_log(&text(&lines)).expect_err("reordered");
        assert_eq!(d.line, 4);
    }

    #[test]
    fn an_altered_line_is_detected() {
        let lines = log(12);
        let mut altered = lines.clone();
        altered[6] = altered[6].replacen("seq=", "seq=1", 1);
        let d = verify_log(&text(&altered)).expect_err("altered body");
        assert_eq!(d.line, 7);
        assert!(d.what.contains("altered"), "{d}");
        // A line rewritten with a correct hash of its own still breaks the next one.
        let mut c = Chain::resume(&verify_log(&text(&lines[..7])).unwrap());
        let mut forged = lines.clone();
        forged[7] = c.seal(&tick_body(8, 99)).line;
        let d = verify_log(&text(&forged)).expect_err("the next line no longer follows");
        assert_eq!(d.line, 9);
    }

    #[test]
    fn malformed_lines_are_detected() {
        let lines = log(3);
        let cut = text(&lines);
        let d = verify_log(&cut[..cut.len() - 1]).expect_err("no newline");
        assert_eq!(d.line, 3);
        assert!(d.what.contains("cut short"));
        for bad in [
            "garbage\n",
            "1 tick t=1 h=zz\n",
            "x tick h=0000000000000000\n",
        ] {
            assert_eq!(verify_log(bad).expect_err(bad).line, 1);
        }
        let mut c = Chain::default();
        let odd = c.seal("1 sleep").line;
        assert!(verify_log(&odd).unwrap_err().what.contains("kind"));
    }

    #[test]
    fn unseal_restores_the_chain() {
        let mut c = Chain::default();
        c.seal("1 tick t=1");
        let before = c;
        let s = c.seal("2 tick t=2");
        c.unseal(&s);
        assert_eq!(c, before);
    }
}
