//! `migr-server`: the migrating server of the paper's evaluation.
//!
//! Serves requests forever: for each one it fills a block with the pattern of the request's
//! sequence number, copies it into the client's buffer with `vcopy` and replies with its
//! request counter. The counter lives in process memory, so it travels with a migration and
//! lets the client see requests served twice.
//!
//! For the migration preflight's tests it can also hold resources a migration must judge:
//! a TCP listener that answers each connection with the request count (`--listen-tcp`), a
//! TCP connection it keeps open (`--connect-tcp`), and a mapped file (`--map-file`).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dvs_examples::{
    fill_pattern, refused_message, reply_message, BindArgs, Request, MAX_BLOCK, MTYPE_REQUEST,
};
use m3ipc::{Endpoint, Errno, Error, Message, Source, NOTIFY_MTYPE};

/// Serve vcopy requests of migr-client (the paper's migration test server).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// MiB of heap to allocate and fill at start, so that a checkpoint image has about the
    /// paper's size (2 gives about 2.5 MB with the program's own pages)
    #[arg(long, default_value_t = 0)]
    ballast_mb: usize,
    /// Milliseconds to wait before each reply: while it waits the server owes a reply, so a
    /// migration's quiesce phase lasts that long (for the crash tests).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Listen on this TCP address (e.g. 0.0.0.0:7000) and answer each connection with a
    /// line `migr-server N` (N: requests served so far), then close it.
    #[arg(long)]
    listen_tcp: Option<String>,
    /// Connect to this TCP address at start and keep the connection open.
    #[arg(long)]
    connect_tcp: Option<String>,
    /// Map this file (read-only, private) at start and keep it mapped.
    #[arg(long)]
    map_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    bind: BindArgs,
}

/// Requests served so far, for the TCP listener's answers.
static SERVED: AtomicU64 = AtomicU64::new(0);

fn main() -> ExitCode {
    let args = Args::parse();
    // Real pages (a non-zero pattern, so no zero-page sharing), kept alive until exit.
    let ballast = make_ballast(args.ballast_mb);
    let held = match hold_resources(&args) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("migr-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ep = match args.bind.bind() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("migr-server: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "migr-server: dc {} ep {} bound on node {}",
        ep.dc(),
        ep.ep(),
        ep.node()
    );
    let served = serve(&mut ep, Duration::from_millis(args.delay_ms));
    std::hint::black_box(&ballast);
    drop(held);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migr-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `--connect-tcp` and `--map-file` hold for the process's lifetime.
struct Held {
    _conn: Option<TcpStream>,
    _map: Option<(usize, usize)>,
}

/// Opens what the flags ask for; the listener runs on a thread of its own.
fn hold_resources(args: &Args) -> Result<Held, String> {
    if let Some(addr) = &args.listen_tcp {
        let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!(
            "migr-server: listening on {}",
            l.local_addr().map_err(|e| e.to_string())?
        );
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut conn = conn;
                let _ = writeln!(conn, "migr-server {}", SERVED.load(Ordering::SeqCst));
            }
        });
    }
    let conn = match &args.connect_tcp {
        Some(addr) => {
            let c =
                TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let local = c.local_addr().map_err(|e| e.to_string())?;
            println!("migr-server: connected to {addr} from {local}");
            Some(c)
        }
        None => None,
    };
    let map = match &args.map_file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let len = f.metadata().map_err(|e| e.to_string())?.len() as usize;
            // SAFETY: a fresh private read-only mapping of an open file; nothing aliases it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len.max(1),
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!(
                    "cannot map {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            // The mapping keeps the file; the descriptor is closed here.
            println!("migr-server: mapped {} ({len} bytes)", path.display());
            Some((p as usize, len))
        }
        None => None,
    };
    Ok(Held {
        _conn: conn,
        _map: map,
    })
}

/// `mb` MiB of heap, every byte written with a non-zero pattern.
fn make_ballast(mb: usize) -> Vec<u8> {
    let mut v = vec![0u8; mb << 20];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) | 1;
    }
    std::hint::black_box(v)
}

/// Serves until the node kernel connection fails or the node shuts down.
fn serve(ep: &mut Endpoint, delay: Duration) -> Result<(), Error> {
    // Reused for every request: only the pattern changes.
    let mut block: Vec<u8> = Vec::new();
    // A cooperative migration restarts this program on another node: the counter comes back
    // from the snapshot the hook below took on the source.
    let mut counter: u64 = match ep.take_restored() {
        Some(snap) if snap.len() == 8 => u64::from_le_bytes(snap.try_into().expect("8 bytes")),
        _ => 0,
    };
    if counter > 0 {
        println!("migr-server: restored from a snapshot at {counter} requests served");
    }
    let shared = Arc::new(AtomicU64::new(counter));
    let hook_view = shared.clone();
    ep.set_snapshot_hook(move || hook_view.load(Ordering::SeqCst).to_le_bytes().to_vec());
    loop {
        shared.store(counter, Ordering::SeqCst);
        SERVED.store(counter, Ordering::SeqCst);
        let msg = match ep.receive(Source::Any) {
            Ok(m) => m,
            Err(e) if e.is_connection_error() => return Err(e),
            Err(Error::Ipc(Errno::Shutdown)) => {
                println!("migr-server: node kernel shutting down after {counter} requests");
                return Ok(());
            }
            Err(e @ Error::Ipc(Errno::NotBound)) => return Err(e),
            Err(e) => {
                eprintln!("migr-server: receive: {e}");
                // Avoid a hot loop should the error repeat.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if msg.mtype == NOTIFY_MTYPE {
            continue;
        }
        if msg.mtype != MTYPE_REQUEST {
            eprintln!(
                "migr-server: ignoring message of type {:#x} from ep {}",
                msg.mtype, msg.source
            );
            // The sender may be waiting in sendrec; do not leave it hanging.
            let _ = ep.reply(msg.source, &Message::new(dvs_examples::MTYPE_REFUSED));
            continue;
        }
        let req = Request::from_message(&msg);
        let client = msg.source;
        if req.size > MAX_BLOCK as u64 {
            eprintln!(
                "migr-server: seq {} from ep {client}: block of {} bytes refused",
                req.seq, req.size
            );
            refuse(ep, client, req.seq)?;
            continue;
        }
        block.resize(req.size as usize, 0);
        fill_pattern(req.seq, &mut block);
        if let Err(e) = ep.vcopy_to(client, req.addr, &block) {
            if e.is_connection_error() {
                return Err(e);
            }
            eprintln!("migr-server: seq {} from ep {client}: vcopy: {e}", req.seq);
            refuse(ep, client, req.seq)?;
            continue;
        }
        counter += 1;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        match ep.reply(client, &reply_message(req.seq, counter, req.size)) {
            Ok(()) => {}
            Err(e) if e.is_connection_error() => return Err(e),
            // Typically the client died after the copy; the next client goes on.
            Err(e) => eprintln!("migr-server: seq {} to ep {client}: reply: {e}", req.seq),
        }
        if counter % 100 == 0 {
            // Asking the node each time shows where the server runs after a migration.
            let node = match ep.getep() {
                Ok((_, _, node)) => node.to_string(),
                Err(e) if e.is_connection_error() => return Err(e),
                Err(e) => format!("? ({e})"),
            };
            println!(
                "migr-server: {counter} requests served (last seq {} from ep {client}, {} bytes) on node {node}",
                req.seq, req.size
            );
        }
    }
}

/// Tells a waiting client its request was not served. A failure other than a lost node
/// kernel connection is only logged: the client may have died.
fn refuse(ep: &mut Endpoint, client: m3ipc::Ep, seq: u64) -> Result<(), Error> {
    match ep.reply(client, &refused_message(seq)) {
        Ok(()) => Ok(()),
        Err(e) if e.is_connection_error() => Err(e),
        Err(e) => {
            eprintln!("migr-server: seq {seq} to ep {client}: refusal: {e}");
            Ok(())
        }
    }
}
