//! `app-server`: a realistic server to migrate (see `dvs_examples::app`).
//!
//! Threads: the receiver (this program's main thread) owns the endpoint, because an m3ipc
//! connection carries one call at a time and `Endpoint` methods take `&mut self`; it hands
//! each request to a pool of `--workers` threads over a channel and replies with what the
//! worker sends back. The workers compute the answer (a cache lookup, the helper child's
//! value, the store), append the request's line to `app.log` and answer. A timer thread
//! (a periodic `timerfd`) appends a `tick` line to the same chain. The helper child is this
//! program again (`--helper`), connected by two pipes, or by a TCP connection over the
//! loopback (`--helper-link tcp`: a connection with both ends inside the migrated tree).
//!
//! The log file stays open for the whole run and every line is one `write` to it, so a
//! checkpoint always sees whole lines; a log left by an earlier run in the same working
//! directory is verified and continued.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use clap::Parser;
use dvs_examples::app::log::Chain;
use dvs_examples::app::{
    helper_value, refused, request_body, results, tick_body, verify_log, Answer, AppRequest, Cache,
    Op, Status, Store,
};
use dvs_examples::BindArgs;
use m3ipc::{Endpoint, Ep, Errno, Error, Message, Source, NOTIFY_MTYPE};

/// The log's file name in the working directory.
const LOG_FILE: &str = "app.log";
/// The effective configuration, written at start (a file that does not change).
const CONF_FILE: &str = "app.conf";

/// Serve app-client: worker pool, hash-chained log, helper child, timer, cache.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Worker threads computing the answers
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Working directory: `app.log` and `app.conf` are kept there
    #[arg(long, default_value = ".")]
    workdir: PathBuf,
    /// MiB of cache to fill at start (at least 64 KiB are used)
    #[arg(long, default_value_t = 16)]
    cache_mb: u64,
    /// Period of the timer's ticks in milliseconds
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    tick_ms: u64,
    /// Milliseconds to wait before each reply (the server owes the reply meanwhile)
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// How the helper child is connected: two pipes, or a TCP connection on 127.0.0.1
    #[arg(long, value_enum, default_value_t = HelperLink::Pipe)]
    helper_link: HelperLink,
    /// Run as the helper child: answer on stdin/stdout (started by the server itself)
    #[arg(long, hide = true)]
    helper: bool,
    /// As the helper child: answer on a TCP connection to this port of 127.0.0.1 instead
    #[arg(long, hide = true)]
    helper_port: Option<u16>,
    #[command(flatten)]
    bind: BindArgs,
}

/// How the server talks to its helper child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HelperLink {
    /// The child's stdin and stdout.
    Pipe,
    /// A TCP connection on the loopback, both ends in the server's tree.
    Tcp,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.helper {
        return match run_helper(args.helper_port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("app-server helper: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("app-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Helper request: operation byte, key, log position (little-endian).
const HELPER_REQ: usize = 17;
/// Helper operation: [`helper_value`] of key and position.
const HELPER_VALUE: u8 = 0;
/// Helper operation: the helper's own pid (in its pid namespace).
const HELPER_PID: u8 = 1;

/// The helper child: answers `[value, calls so far]` to each request until its input ends
/// (stdin, or the TCP connection to `port`). The call count lets the server notice a helper
/// that lost a request or was replaced.
fn run_helper(port: Option<u16>) -> io::Result<()> {
    let (mut input, mut output): (Box<dyn Read>, Box<dyn Write>) = match port {
        Some(port) => {
            let stream = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))?;
            stream.set_nodelay(true)?;
            (Box::new(stream.try_clone()?), Box::new(stream))
        }
        None => (Box::new(io::stdin().lock()), Box::new(io::stdout().lock())),
    };
    let mut calls: u64 = 0;
    let mut req = [0u8; HELPER_REQ];
    loop {
        match input.read_exact(&mut req) {
            Ok(()) => {}
            // The server closed the pipe (or ended): nothing more to do.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let key = u64::from_le_bytes(req[1..9].try_into().expect("8 bytes"));
        let pos = u64::from_le_bytes(req[9..17].try_into().expect("8 bytes"));
        let value = match req[0] {
            HELPER_VALUE => helper_value(key, pos),
            HELPER_PID => std::process::id() as u64,
            op => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown operation {op}"),
                ))
            }
        };
        calls += 1;
        let mut rep = [0u8; 16];
        rep[..8].copy_from_slice(&value.to_le_bytes());
        rep[8..].copy_from_slice(&calls.to_le_bytes());
        output.write_all(&rep)?;
        output.flush()?;
    }
}

/// The server's end of the link to its helper.
struct Helper {
    child: Child,
    to: Box<dyn Write + Send>,
    from: Box<dyn Read + Send>,
    /// Calls made, which the helper's count must match.
    calls: u64,
    /// Set once a call failed: the helper's state is unknown, every later answer is refused.
    broken: bool,
}

impl Helper {
    /// Starts this program again as the helper child, linked by `link`.
    fn start(link: HelperLink) -> io::Result<Helper> {
        // /proc/self/exe: the same binary even if the path it was started by changed.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("--helper").stderr(Stdio::inherit());
        let (child, to, from): (Child, Box<dyn Write + Send>, Box<dyn Read + Send>) = match link {
            HelperLink::Pipe => {
                let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
                let to = child.stdin.take().expect("piped stdin");
                let from = child.stdout.take().expect("piped stdout");
                (child, Box::new(to), Box::new(from))
            }
            HelperLink::Tcp => {
                let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
                let port = listener.local_addr()?.port();
                let mut child = cmd
                    .args(["--helper-port", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?;
                // Bounded: a helper that died before connecting must not hang the server.
                listener.set_nonblocking(true)?;
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let stream = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Some(status) = child.try_wait()? {
                                return Err(io::Error::other(format!(
                                    "the helper ended ({status}) before connecting"
                                )));
                            }
                            if std::time::Instant::now() > deadline {
                                let _ = child.kill();
                                let _ = child.wait();
                                return Err(io::Error::other(
                                    "the helper did not connect within 10 s",
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(e),
                    }
                };
                // Only the connection stays: a listener would be one more socket to move.
                drop(listener);
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                (child, Box::new(stream.try_clone()?), Box::new(stream))
            }
        };
        Ok(Helper {
            child,
            to,
            from,
            calls: 0,
            broken: false,
        })
    }

    /// One call to the helper.
    fn call(&mut self, op: u8, key: u64, pos: u64) -> io::Result<u64> {
        if self.broken {
            return Err(io::Error::other("the helper failed before"));
        }
        let r = self.exchange(op, key, pos);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn exchange(&mut self, op: u8, key: u64, pos: u64) -> io::Result<u64> {
        let mut req = [0u8; HELPER_REQ];
        req[0] = op;
        req[1..9].copy_from_slice(&key.to_le_bytes());
        req[9..].copy_from_slice(&pos.to_le_bytes());
        self.to.write_all(&req)?;
        let mut rep = [0u8; 16];
        self.from.read_exact(&mut rep)?;
        self.calls += 1;
        let value = u64::from_le_bytes(rep[..8].try_into().expect("8 bytes"));
        let calls = u64::from_le_bytes(rep[8..].try_into().expect("8 bytes"));
        if calls != self.calls {
            return Err(io::Error::other(format!(
                "the helper counts {calls} calls, the server made {}",
                self.calls
            )));
        }
        Ok(value)
    }

    /// The helper's pid as it reports it, checked against the child this server started.
    fn pid(&mut self) -> io::Result<u32> {
        let pid = self.call(HELPER_PID, 0, 0)? as u32;
        if pid != self.child.id() {
            self.broken = true;
            return Err(io::Error::other(format!(
                "the helper says it is pid {pid}, the server started pid {}",
                self.child.id()
            )));
        }
        Ok(pid)
    }
}

/// What the log's lock guards: everything that must change together with the chain.
struct Logged {
    file: File,
    chain: Chain,
    helper: Helper,
    ticks: u64,
}

impl Logged {
    /// Seals `body` as the next line and writes it with one `write`; on failure the chain
    /// is rolled back so it still matches the file.
    fn append(&mut self, body: &str) -> io::Result<(u64, u64)> {
        let sealed = self.chain.seal(body);
        if let Err(e) = self.file.write_all(sealed.line.as_bytes()) {
            self.chain.unseal(&sealed);
            return Err(e);
        }
        Ok((sealed.prev_hash, sealed.hash))
    }
}

/// What the workers and the timer share.
struct Shared {
    logged: Mutex<Logged>,
    cache: Cache,
    store: Mutex<Store>,
    workers: u16,
}

impl Shared {
    fn logged(&self) -> MutexGuard<'_, Logged> {
        // A poisoned lock means a worker panicked; the state it guards is still consistent
        // line by line, because the chain is advanced only with a written line.
        self.logged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one request: the answer message, or why it was refused.
    fn serve(&self, client: Ep, req: &AppRequest) -> Result<Message, String> {
        let mut logged = self.logged();
        let log_seq = logged.chain.next_seq();
        let (helper, status) = if req.op == Op::Status {
            let helper_pid = logged.helper.pid().map_err(|e| format!("helper: {e}"))?;
            let status = Status {
                workers: self.workers,
                threads: thread_count(),
                helper_pid,
                cache_bytes: self.cache.bytes(),
                ticks: logged.ticks,
            };
            (0, status)
        } else {
            let v = logged
                .helper
                .call(HELPER_VALUE, req.key, log_seq)
                .map_err(|e| format!("helper: {e}"))?;
            (v, Status::default())
        };
        let result = {
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            // The request works on a copy of the one entry it may change, which replaces the
            // entry only once its line is written: a refused put leaves the store as it was.
            let mut scratch: Store = store
                .get_key_value(&(client, req.key))
                .map(|(k, v)| (*k, *v))
                .into_iter()
                .collect();
            let r = results(req, client, &self.cache, &mut scratch, helper, status);
            let body = request_body(log_seq, client, req, &r);
            let (prev_hash, hash) = logged
                .append(&body)
                .map_err(|e| format!("{LOG_FILE}: {e}"))?;
            store.extend(scratch);
            Answer {
                seq: req.seq,
                log_seq,
                prev_hash,
                hash,
                result: r,
            }
        };
        Ok(result.to_message())
    }

    /// One timer tick: counted and logged.
    fn tick(&self) -> io::Result<()> {
        let mut logged = self.logged();
        let body = tick_body(logged.chain.next_seq(), logged.ticks + 1);
        logged.append(&body)?;
        logged.ticks += 1;
        Ok(())
    }
}

/// Threads of this process now.
fn thread_count() -> u16 {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count() as u16)
        .unwrap_or(0)
}

/// A request handed to the pool.
struct Job {
    client: Ep,
    req: AppRequest,
}

/// A worker: takes jobs until the channel closes and sends each answer (or refusal) back.
fn worker(shared: Arc<Shared>, jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Message>) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let msg = shared.serve(job.client, &job.req).unwrap_or_else(|why| {
            eprintln!(
                "app-server: request {} of ep {} refused: {why}",
                job.req.seq, job.client
            );
            refused(job.req.seq)
        });
        if done.send(msg).is_err() {
            return;
        }
    }
}

/// The timer thread: a periodic timerfd, one tick line per expiry read.
fn timer(shared: Arc<Shared>, period: Duration) -> io::Result<()> {
    // SAFETY: timerfd_create has no memory-safety preconditions; the fd is owned below.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let mut tfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: period.as_secs() as libc::time_t,
        tv_nsec: period.subsec_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: spec is a valid itimerspec; the old value is not asked for.
    if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut expiries = [0u8; 8];
    loop {
        // read_exact retries a read that a checkpoint's freeze interrupted (EINTR).
        tfd.read_exact(&mut expiries)?;
        shared.tick()?;
    }
}

/// Opens the log in `dir`, verifying what an earlier run left there, and returns it with
/// the chain to continue.
fn open_log(dir: &Path) -> Result<(File, Chain), String> {
    let path = dir.join(LOG_FILE);
    let chain = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let s = verify_log(&text)
                .map_err(|d| format!("{} is damaged, not appending to it: {d}", path.display()))?;
            Chain::resume(&s)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Chain::default(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok((file, chain))
}

fn run(args: &Args) -> Result<(), String> {
    let dir = &args.workdir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let conf = format!(
        "workers={}\ncache_mb={}\ntick_ms={}\ndelay_ms={}\n",
        args.workers, args.cache_mb, args.tick_ms, args.delay_ms
    );
    std::fs::write(dir.join(CONF_FILE), conf)
        .map_err(|e| format!("cannot write {CONF_FILE}: {e}"))?;
    let (file, chain) = open_log(dir)?;
    let cache = Cache::new(args.cache_mb);
    let mut helper =
        Helper::start(args.helper_link).map_err(|e| format!("cannot start the helper: {e}"))?;
    let helper_pid = helper.pid().map_err(|e| format!("helper: {e}"))?;
    let mut ep = args.bind.bind().map_err(|e| format!("cannot bind: {e}"))?;
    let shared = Arc::new(Shared {
        logged: Mutex::new(Logged {
            file,
            chain,
            helper,
            ticks: 0,
        }),
        cache,
        store: Mutex::new(Store::new()),
        workers: args.workers,
    });
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Message>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    for i in 0..args.workers {
        let (s, j, d) = (shared.clone(), job_rx.clone(), done_tx.clone());
        thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker(s, j, d))
            .map_err(|e| format!("cannot start a worker: {e}"))?;
    }
    drop(done_tx);
    let period = Duration::from_millis(args.tick_ms);
    let s = shared.clone();
    thread::Builder::new()
        .name("timer".into())
        .spawn(move || {
            if let Err(e) = timer(s, period) {
                // Without ticks the status answers show it (their count stops).
                eprintln!("app-server: timer: {e}");
            }
        })
        .map_err(|e| format!("cannot start the timer: {e}"))?;
    println!(
        "app-server: dc {} ep {} bound on node {}, workdir {}, {} workers, helper pid {helper_pid}, \
         cache {} bytes, log continues after line {}",
        ep.dc(),
        ep.ep(),
        ep.node(),
        dir.display(),
        args.workers,
        shared.cache.bytes(),
        shared.logged().chain.last_seq,
    );
    let delay = Duration::from_millis(args.delay_ms);
    receive_loop(&mut ep, &job_tx, &done_rx, delay).map_err(|e| e.to_string())
}

/// The receiver: one request at a time to the pool, its answer back to the client.
fn receive_loop(
    ep: &mut Endpoint,
    jobs: &Sender<Job>,
    done: &Receiver<Message>,
    delay: Duration,
) -> Result<(), Error> {
    let mut served: u64 = 0;
    loop {
        let msg = match ep.receive(Source::Any) {
            Ok(m) => m,
            Err(e) if e.is_connection_error() => return Err(e),
            Err(Error::Ipc(Errno::Shutdown)) => {
                println!("app-server: node kernel shutting down after {served} requests");
                return Ok(());
            }
            Err(e @ Error::Ipc(Errno::NotBound)) => return Err(e),
            Err(e) => {
                eprintln!("app-server: receive: {e}");
                // Avoid a hot loop should the error repeat.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if msg.mtype == NOTIFY_MTYPE {
            continue;
        }
        let client = msg.source;
        let answer = match AppRequest::from_message(&msg) {
            Some(req) => {
                jobs.send(Job { client, req })
                    .map_err(|_| Error::Protocol("every worker is gone".into()))?;
                done.recv()
                    .map_err(|_| Error::Protocol("every worker is gone".into()))?
            }
            None => {
                eprintln!(
                    "app-server: ignoring message of type {:#x} from ep {client}",
                    msg.mtype
                );
                // The sender may be waiting in sendrec; do not leave it hanging.
                refused(msg.word(dvs_examples::app::W_SEQ))
            }
        };
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        served += 1;
        match ep.reply(client, &answer) {
            Ok(()) => {}
            Err(e) if e.is_connection_error() => return Err(e),
            // Typically the client died; the next one goes on.
            Err(e) => eprintln!("app-server: reply to ep {client}: {e}"),
        }
        if served % 500 == 0 {
            // Asking the node each time shows where the server runs after a migration.
            let node = match ep.getep() {
                Ok((_, _, node)) => node.to_string(),
                Err(e) if e.is_connection_error() => return Err(e),
                Err(e) => format!("? ({e})"),
            };
            println!("app-server: {served} requests served on node {node}");
        }
    }
}
