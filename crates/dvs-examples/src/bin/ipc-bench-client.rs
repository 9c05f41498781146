//! `ipc-bench-client`: the Rust side of `dvs bench ipc --lang c|python`, a process of its
//! own like the C and Python clients, so that every language pays the same process switches.
//! Binds EP of DC at SOCKET, does WARMUP then N sendrec round trips to SERVER (the bench
//! server echoes type 0x6201 with the same first word) and prints each measured round trip
//! in nanoseconds, one per line.
//!
//! `ipc-bench-client SOCKET DC EP SERVER WARMUP N`

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use m3ipc::{Endpoint, Message, Timeout};

/// The message type the bench server echoes.
const ECHO: i32 = 0x6201;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, dc, ep, server, warmup, n] = args.as_slice() else {
        eprintln!("usage: ipc-bench-client SOCKET DC EP SERVER WARMUP N");
        return ExitCode::from(2);
    };
    let parsed = (
        dc.parse(),
        ep.parse(),
        server.parse(),
        warmup.parse::<u64>(),
        n.parse::<u64>(),
    );
    let (Ok(dc), Ok(ep), Ok(server), Ok(warmup), Ok(n)) = parsed else {
        eprintln!("ipc-bench-client: DC, EP, SERVER, WARMUP and N are numbers");
        return ExitCode::from(2);
    };
    let mut me = match Endpoint::bind_at(socket, dc, ep) {
        Ok(me) => me,
        Err(e) => {
            eprintln!("ipc-bench-client: bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ns = Vec::with_capacity(n as usize);
    for i in 0..warmup + n {
        let mut m = Message::new(ECHO);
        m.set_word(0, i);
        let t0 = Instant::now();
        let got = me.sendrec_timeout(server, &m, Timeout::Millis(5000));
        let dt = t0.elapsed();
        match got {
            Ok(r) if r.word(0) == i => {}
            Ok(r) => {
                eprintln!("ipc-bench-client: round trip {i} answered {}", r.word(0));
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("ipc-bench-client: sendrec {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
        if i >= warmup {
            ns.push(dt.as_nanos() as u64);
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for x in ns {
        if writeln!(out, "{x}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
