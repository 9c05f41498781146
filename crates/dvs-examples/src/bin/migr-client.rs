//! `migr-client`: the checking client of the paper's evaluation.
//!
//! Does `--iterations` sendrec calls to the server, each with a fresh zeroed buffer that the
//! server fills with `vcopy`, and checks every reply, block and server counter. Prints one
//! summary line (or a JSON object) and exits 0 only if every iteration was ok.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use dvs_examples::{parse_block_size, BindArgs, Outcome, Request, Tally};
use m3ipc::{Ep, Errno, Error, Timeout};

/// Check a migr-server through N sendrec + vcopy round trips (the paper's migration test client).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Endpoint of the migr-server in the same DC
    #[arg(long, allow_negative_numbers = true)]
    server: Ep,
    /// Number of requests
    #[arg(long)]
    iterations: u64,
    /// Bytes the server copies per request (suffixes K, M; at most 16M)
    #[arg(long, value_parser = parse_block_size)]
    block_size: usize,
    /// Timeout of each sendrec in milliseconds [default: none]
    #[arg(long)]
    timeout_ms: Option<u32>,
    /// How long to wait for the server to be bound, in milliseconds
    #[arg(long, default_value_t = 30_000)]
    wait_ms: u32,
    /// Print the result as a JSON object instead of the summary line
    #[arg(long)]
    json: bool,
    /// Write `migr-client: N iterations done` to stderr every N iterations, so that a
    /// watcher of the output (`dvs run --wait`, from any host) sees how far the run is
    #[arg(long)]
    progress: Option<u64>,
    #[command(flatten)]
    bind: BindArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut ep = match args.bind.bind() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("migr-client: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = ep.wait_for_bind(args.server, Timeout::Millis(args.wait_ms)) {
        eprintln!("migr-client: server ep {} not bound: {e}", args.server);
        return ExitCode::FAILURE;
    }
    let timeout = args.timeout_ms.map_or(Timeout::Forever, Timeout::Millis);
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut done = 0;
    while done < args.iterations {
        // Sequence numbers from 1 so they read like the server's counter in logs.
        let seq = done + 1;
        done += 1;
        // A fresh buffer every time: the server must fill pages this process never touched.
        let mut buf = vec![0u8; args.block_size];
        let req = Request {
            seq,
            addr: buf.as_mut_ptr() as u64,
            size: args.block_size as u64,
        };
        let t0 = Instant::now();
        // The node kernel writes `buf` while this call blocks; its address escaped into the
        // request, so the compiler does not assume `buf` still holds zeros afterwards.
        let res = ep.sendrec_timeout(args.server, &req.to_message(), timeout);
        tally.stall(t0.elapsed());
        let outcome = match res {
            Ok(rep) => tally.reply(seq, args.block_size, &rep, &buf),
            Err(e) => {
                let fatal = is_fatal(&e);
                let o = tally.lost(format!("seq {seq}: sendrec: {e}"));
                if fatal {
                    report(&o);
                    // Nothing more can be sent: the rest of the run is lost too.
                    let rest = args.iterations - done;
                    tally.lost += rest;
                    eprintln!("migr-client: giving up, {rest} iterations not attempted");
                    break;
                }
                o
            }
        };
        report(&outcome);
        if args.progress.is_some_and(|p| p > 0 && done % p == 0) {
            eprintln!("migr-client: {done} iterations done");
        }
    }
    let elapsed = start.elapsed();
    let _ = ep.unbind();
    if args.json {
        println!("{}", tally.to_json(elapsed));
    } else {
        println!("{}", tally.summary(elapsed));
    }
    if tally.ok == args.iterations {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Errors after which no further request can succeed.
fn is_fatal(e: &Error) -> bool {
    e.is_connection_error() || matches!(e, Error::Ipc(Errno::NotBound | Errno::Shutdown))
}

fn report(o: &Outcome) {
    match o {
        Outcome::Ok => {}
        Outcome::Corrupt(why) => eprintln!("migr-client: corrupt: {why}"),
        Outcome::Lost(why) => eprintln!("migr-client: lost: {why}"),
        Outcome::Duplicated(why) => eprintln!("migr-client: duplicated: {why}"),
    }
}
