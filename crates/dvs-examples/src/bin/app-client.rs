//! `app-client`: the checking client of `app-server` (see `dvs_examples::app`).
//!
//! Sends `--count` requests (status, puts, gets and lookups in turn) and checks every
//! answer exactly: the result recomputed from the request, the log line's hash rebuilt, the
//! log positions going forward. Prints one summary line (or a JSON object) and exits 0 only
//! if every request was ok. `--status` asks for one status and prints it; `--verify-log
//! PATH` checks a whole `app.log` instead and exits non-zero on any defect.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use dvs_examples::app::{verify_log, ClientCheck};
use dvs_examples::{BindArgs, Outcome};
use m3ipc::{Ep, Errno, Error, Timeout};

/// Check an app-server through N requests, or check an app.log file.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Endpoint of the app-server in the same DC
    #[arg(
        long,
        allow_negative_numbers = true,
        required_unless_present = "verify_log"
    )]
    server: Option<Ep>,
    /// Number of requests
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Ask for one status and print it (as JSON with --json)
    #[arg(long, conflicts_with = "count")]
    status: bool,
    /// Timeout of each sendrec in milliseconds [default: none]
    #[arg(long)]
    timeout_ms: Option<u32>,
    /// How long to wait for the server to be bound, in milliseconds
    #[arg(long, default_value_t = 30_000)]
    wait_ms: u32,
    /// Print the result as a JSON object instead of a summary line
    #[arg(long)]
    json: bool,
    /// Write `app-client: N requests done` to stderr every N requests
    #[arg(long)]
    progress: Option<u64>,
    /// Check this app.log (every line, the chain, no gap) instead of calling a server
    #[arg(long, value_name = "PATH")]
    verify_log: Option<PathBuf>,
    #[command(flatten)]
    bind: BindArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.verify_log {
        return check_log(path, args.json);
    }
    let server = args.server.expect("clap requires --server");
    let mut ep = match args.bind.bind() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("app-client: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = ep.wait_for_bind(server, Timeout::Millis(args.wait_ms)) {
        eprintln!("app-client: server ep {server} not bound: {e}");
        return ExitCode::FAILURE;
    }
    let count = if args.status { 1 } else { args.count };
    let timeout = args.timeout_ms.map_or(Timeout::Forever, Timeout::Millis);
    let mut check = ClientCheck::new(ep.ep());
    let start = Instant::now();
    let mut done = 0;
    while done < count {
        // Sequence numbers from 1, like the server's log lines.
        let seq = done + 1;
        done += 1;
        let req = check.request(seq);
        let t0 = Instant::now();
        let res = ep.sendrec_timeout(server, &req.to_message(), timeout);
        check.stall(t0.elapsed());
        let outcome = match res {
            Ok(rep) => check.check(&req, &rep),
            Err(e) => {
                let fatal = is_fatal(&e);
                let o = check.lost(&req, format!("seq {seq}: sendrec: {e}"));
                if fatal {
                    report(&o);
                    // Nothing more can be sent: the rest of the run is lost too.
                    let rest = count - done;
                    check.tally.lost += rest;
                    eprintln!("app-client: giving up, {rest} requests not attempted");
                    break;
                }
                o
            }
        };
        report(&outcome);
        if args.progress.is_some_and(|p| p > 0 && done % p == 0) {
            eprintln!("app-client: {done} requests done");
        }
    }
    let elapsed = start.elapsed();
    let _ = ep.unbind();
    let json = check.to_json(elapsed);
    if args.status {
        let mut status = json["last_status"].clone();
        if let Some(o) = status.as_object_mut() {
            o.insert("log_seq".into(), json["last_log_seq"].clone());
        }
        if args.json {
            println!("{status}");
        } else {
            println!("status {status}");
        }
    } else if args.json {
        println!("{json}");
    } else {
        println!("{}", check.summary(elapsed));
    }
    if check.tally.ok == count {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--verify-log`: checks the file and prints what it holds, or its first defect.
fn check_log(path: &std::path::Path, json: bool) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("app-client: cannot read {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let name = path.display().to_string();
    match verify_log(&text) {
        Ok(s) => {
            if json {
                println!("{}", s.to_json());
            } else {
                println!("{}", s.summary(&name));
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            if json {
                let v = serde_json::json!({
                    "intact": false,
                    "defect_line": d.line,
                    "defect": d.what,
                    "intact_lines": d.intact.lines,
                });
                println!("{v}");
            } else {
                println!("{name}: {d}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Errors after which no further request can succeed.
fn is_fatal(e: &Error) -> bool {
    e.is_connection_error() || matches!(e, Error::Ipc(Errno::NotBound | Errno::Shutdown))
}

fn report(o: &Outcome) {
    match o {
        Outcome::Ok => {}
        Outcome::Corrupt(why) => eprintln!("app-client: corrupt: {why}"),
        Outcome::Lost(why) => eprintln!("app-client: lost: {why}"),
        Outcome::Duplicated(why) => eprintln!("app-client: duplicated: {why}"),
    }
}
