//! `dvs bench`: measures dvs against raw socket baselines taken in the same run.
//!
//! `dvs bench ipc` starts its own 2-node cluster on loopback (under a temporary folder in
//! `/tmp`, with free ports), measures the raw baselines (Unix-socket and TCP ping-pong, TCP
//! stream bandwidth) and the dvs figures (sendrec round trips, one-way sends, vcopy of 1 MiB
//! blocks, local and remote), prints them side by side with the ratios against the targets,
//! and always stops the cluster at the end. A missed target is reported, never an error.
//!
//! Every party is a thread of the bench process: each dvs endpoint has its own `m3ipc`
//! connection to its node kernel, and the raw baselines use two threads as well, so both
//! sides pay the same thread wake-ups.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::ClusterConfig;
use m3ipc::{Endpoint, Ep, Timeout};
use serde::Serialize;

use crate::bench_serve::{send_rate, sendrec_samples, vcopy_rate, Server, BLOCK, RAW_MSG};
use crate::cluster;
use crate::helpers::{nearest_rank, progress, ClusterGuard};

/// First peer port tried for the bench's own cluster (free ports are searched from here).
const BENCH_BASE_PORT: u16 = 7700;

/// Endpoint of the server on the client's node.
const EP_LOCAL_SERVER: Ep = 1;
/// Endpoint of the server on the other node.
const EP_REMOTE_SERVER: Ep = 2;
/// Endpoint of the client.
const EP_CLIENT: Ep = 10;

/// Options of `dvs bench ipc`.
#[derive(Debug, Clone)]
pub struct IpcOptions {
    /// Measured round trips per latency test (and messages per throughput test).
    pub iterations: u32,
    /// MiB moved by each bandwidth test (raw TCP stream, each vcopy test).
    pub bulk_mib: u32,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// Latency figures of one ping-pong test, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Measured round trips (after the warm-up).
    pub samples: usize,
    /// Median round trip.
    pub median_us: f64,
    /// 99th percentile round trip.
    pub p99_us: f64,
    /// Mean round trip.
    pub mean_us: f64,
    /// Fastest round trip.
    pub min_us: f64,
}

impl Latency {
    /// Summarizes round trips given in nanoseconds.
    pub fn from_samples(mut ns: Vec<u64>) -> Latency {
        ns.sort_unstable();
        let n = ns.len().max(1);
        let at = |q: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            nearest_rank(&ns, q) as f64 / 1000.0
        };
        Latency {
            samples: ns.len(),
            median_us: at(0.5),
            p99_us: at(0.99),
            mean_us: ns.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
            min_us: ns.first().copied().unwrap_or(0) as f64 / 1000.0,
        }
    }
}

/// How the run was set up, for the header and the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Measured round trips per latency test.
    pub iterations: u32,
    /// Unmeasured round trips before each latency test.
    pub warmup: u32,
    /// MiB per bandwidth test.
    pub bulk_mib: u32,
    /// Bytes per raw message.
    pub msg_bytes: usize,
    /// Bytes per TCP write and per vcopy.
    pub block_bytes: usize,
    /// CPUs available to the bench.
    pub cpus: usize,
    /// CPU model, from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// /proc/loadavg before the run.
    pub loadavg_before: String,
    /// /proc/loadavg after the run.
    pub loadavg_after: String,
    /// How the parties are laid out.
    pub method: String,
}

/// The raw socket baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Raw {
    /// Unix-socket pair ping-pong of 64-byte messages between two threads.
    pub unix_rtt: Latency,
    /// TCP loopback ping-pong of 64-byte messages, `TCP_NODELAY`, between two threads.
    pub tcp_rtt: Latency,
    /// TCP loopback stream of 1 MiB writes, in MB/s (10^6 bytes).
    pub tcp_stream_mb_s: f64,
}

/// The dvs figures.
#[derive(Debug, Clone, Serialize)]
pub struct Dvs {
    /// sendrec round trip, client and server on the same node.
    pub sendrec_local: Latency,
    /// sendrec round trip, client on node0, server on node1.
    pub sendrec_remote: Latency,
    /// Rendezvous sends per second, same node.
    pub send_local_msgs_s: f64,
    /// Rendezvous sends per second, across nodes.
    pub send_remote_msgs_s: f64,
    /// vcopy of 1 MiB blocks by the server into the client (inside a sendrec), same node,
    /// MB/s.
    pub vcopy_local_mb_s: f64,
    /// The same across nodes, MB/s.
    pub vcopy_remote_mb_s: f64,
}

impl Target {
    /// `value` must be at most `factor` times `base` (a latency).
    fn at_most(name: &str, value: f64, base: f64, factor: f64) -> Target {
        Target {
            name: name.into(),
            ratio: value / base,
            target: format!("<= {factor}x"),
            pass: value <= factor * base,
        }
    }

    /// `value` must be at least `share` of `base` (a bandwidth).
    fn at_least(name: &str, value: f64, base: f64, share: f64) -> Target {
        Target {
            name: name.into(),
            ratio: value / base,
            target: format!(">= {:.0}%", share * 100.0),
            pass: value >= share * base,
        }
    }
}

/// What TLS costs on a peer link: remote figures of a TLS cluster and a plaintext cluster,
/// measured in alternating blocks so that both see the same machine noise.
#[derive(Debug, Clone, Serialize)]
pub struct TlsCost {
    /// Alternating blocks per side.
    pub blocks: usize,
    /// Remote sendrec round trip over mutual TLS.
    pub sendrec_tls: Latency,
    /// Remote sendrec round trip in plaintext.
    pub sendrec_plain: Latency,
    /// Remote vcopy of 1 MiB blocks over mutual TLS, MB/s.
    pub vcopy_tls_mb_s: f64,
    /// Remote vcopy of 1 MiB blocks in plaintext, MB/s.
    pub vcopy_plain_mb_s: f64,
}

/// One target and whether this run meets it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured ratio.
    pub ratio: f64,
    /// The target, as text (`<= 1.5x`, `>= 50%`).
    pub target: String,
    /// Whether the ratio meets the target.
    pub pass: bool,
}

/// The whole report of `dvs bench ipc`.
#[derive(Debug, Clone, Serialize)]
pub struct IpcReport {
    /// How the run was set up.
    pub setup: Setup,
    /// Raw baselines.
    pub raw: Raw,
    /// dvs figures (mutual TLS on the links, the default).
    pub dvs: Dvs,
    /// Remote figures with TLS beside the same in plaintext, measured in alternating blocks.
    pub tls: TlsCost,
    /// Ratios against the targets.
    pub targets: Vec<Target>,
}

/// `dvs bench ipc`.
pub fn ipc(opts: &IpcOptions) -> Result<ExitCode> {
    if opts.iterations == 0 || opts.bulk_mib == 0 {
        bail!("--iterations and --bulk-mib must be at least 1");
    }
    let n = opts.iterations as usize;
    let warmup = (opts.iterations / 10).clamp(100, 2000);
    let loadavg_before = loadavg();

    progress("raw Unix-socket ping-pong");
    let (a, b) = UnixStream::pair()?;
    let unix_rtt = raw_pingpong(a, b, warmup as usize, n).context("raw Unix ping-pong")?;
    progress("raw TCP ping-pong");
    let (a, b) = tcp_pair()?;
    let tcp_rtt = raw_pingpong(a, b, warmup as usize, n).context("raw TCP ping-pong")?;
    progress("raw TCP stream");
    let tcp_stream_mb_s = raw_tcp_stream(opts.bulk_mib as usize).context("raw TCP stream")?;
    let raw = Raw {
        unix_rtt,
        tcp_rtt,
        tcp_stream_mb_s,
    };

    let (dvs, tls) = with_clusters(&[true, false], |cfgs| {
        let dvs = dvs_figures(&cfgs[0], warmup as usize, n, opts.bulk_mib as usize)?;
        let tls = tls_vs_plaintext(
            &cfgs[0],
            &cfgs[1],
            warmup as usize,
            n,
            opts.bulk_mib as usize,
        )?;
        Ok((dvs, tls))
    })?;

    let targets = vec![
        Target::at_most(
            "remote sendrec / raw TCP RTT (median)",
            dvs.sendrec_remote.median_us,
            raw.tcp_rtt.median_us,
            1.5,
        ),
        Target::at_most(
            "local sendrec / raw Unix RTT (median)",
            dvs.sendrec_local.median_us,
            raw.unix_rtt.median_us,
            2.0,
        ),
        Target::at_least(
            "remote vcopy / raw TCP stream bandwidth",
            dvs.vcopy_remote_mb_s,
            raw.tcp_stream_mb_s,
            0.5,
        ),
        Target::at_most(
            "remote sendrec, TLS / plaintext (median)",
            tls.sendrec_tls.median_us,
            tls.sendrec_plain.median_us,
            1.1,
        ),
        Target::at_least(
            "remote vcopy, TLS / plaintext",
            tls.vcopy_tls_mb_s,
            tls.vcopy_plain_mb_s,
            0.8,
        ),
    ];
    let report = IpcReport {
        setup: Setup {
            iterations: opts.iterations,
            warmup,
            bulk_mib: opts.bulk_mib,
            msg_bytes: RAW_MSG,
            block_bytes: BLOCK,
            cpus: thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            loadavg_before,
            loadavg_after: loadavg(),
            method: "every party is a thread of the bench process; each dvs endpoint has its \
                     own m3ipc connection to its node kernel (2 node kernels, separate \
                     processes, on loopback); raw baselines use two threads as well"
                .into(),
        },
        raw,
        dvs,
        tls,
        targets,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

// ----- raw baselines -------------------------------------------------------------------------

/// Two connected TCP loopback sockets with `TCP_NODELAY`.
fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// Ping-pong of [`RAW_MSG`]-byte messages: this thread writes on `a` and waits for the echo
/// that a second thread writes back on `b`. Returns the round trips after `warmup`.
pub(crate) fn raw_pingpong<S>(mut a: S, mut b: S, warmup: usize, n: usize) -> Result<Latency>
where
    S: Read + Write + Send + 'static,
{
    let echo: JoinHandle<io::Result<()>> = thread::spawn(move || {
        let mut buf = [0u8; RAW_MSG];
        loop {
            match b.read_exact(&mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            b.write_all(&buf)?;
        }
    });
    let mut buf = [0x5au8; RAW_MSG];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let t = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(a);
    echo.join().map_err(|_| anyhow!("echo thread panicked"))??;
    Ok(Latency::from_samples(samples))
}

/// Streams `mib` writes of 1 MiB over TCP loopback to a reading thread. Returns MB/s (10^6
/// bytes per second).
fn raw_tcp_stream(mib: usize) -> Result<f64> {
    let total = mib * BLOCK;
    // A warm-up of a few blocks is part of the total; it only fills the socket buffers.
    let secs = raw_tcp_send(total, BLOCK)?.as_secs_f64();
    Ok(total as f64 / secs / 1e6)
}

/// Sends `total` bytes over a fresh TCP loopback connection to a reading thread in writes of
/// `chunk` bytes; returns the time from the first write to the reader's acknowledgement (one
/// byte back) of the last byte.
pub(crate) fn raw_tcp_send(total: usize, chunk: usize) -> Result<Duration> {
    let (mut tx, mut rx) = tcp_pair()?;
    let sink: JoinHandle<io::Result<()>> = thread::spawn(move || {
        let mut buf = vec![0u8; chunk];
        let mut got = 0;
        while got < total {
            let n = rx.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        rx.write_all(&[1])
    });
    let block: Vec<u8> = (0..chunk).map(|i| (i * 7) as u8).collect();
    let t = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        tx.write_all(&block[..n])?;
        left -= n;
    }
    let mut ack = [0u8; 1];
    tx.read_exact(&mut ack)?;
    let took = t.elapsed();
    sink.join().map_err(|_| anyhow!("sink thread panicked"))??;
    Ok(took)
}

// ----- dvs -----------------------------------------------------------------------------------

/// Starts one 2-node cluster per entry of `tls` (mutual TLS or plaintext links) under a
/// fresh folder in /tmp, runs `f` with their configs, and always stops the clusters and removes
/// the folder afterwards (also on error, panic, SIGINT or SIGTERM).
pub(crate) fn with_clusters<T>(
    tls: &[bool],
    f: impl FnOnce(&[ClusterConfig]) -> Result<T>,
) -> Result<T> {
    let dir = std::env::temp_dir().join(format!("dvs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Before the dvs threads start (see ClusterGuard::new).
    let guard = ClusterGuard::new(Some(dir.clone()))?;
    let mut cfgs = Vec::new();
    for (i, &tls) in tls.iter().enumerate() {
        let sub = dir.join(if tls { "tls" } else { "plain" });
        progress(&format!(
            "starting a 2-node cluster with {} links under {}",
            if tls { "mutual TLS" } else { "plaintext" },
            sub.display()
        ));
        let port = BENCH_BASE_PORT + 10 * i as u16;
        let cfg = guard
            .start(|| cluster::start_opts(&sub, 2, port, false, tls))
            .context("cannot start the bench cluster")?;
        cfgs.push(cfg);
    }
    let r = f(&cfgs);
    progress("stopping the bench clusters");
    drop(guard);
    r
}

fn dvs_figures(cfg: &ClusterConfig, warmup: usize, n: usize, bulk_mib: usize) -> Result<Dvs> {
    let dc = cfg.dcs.first().context("the bench cluster has no DC")?.id;
    let node0 = cfg.nodes[0].ipc_socket();
    let node1 = cfg.nodes[1].ipc_socket();
    let local = Server::start(&node0, dc, EP_LOCAL_SERVER)?;
    let remote = Server::start(&node1, dc, EP_REMOTE_SERVER)?;
    let mut client = Endpoint::bind_at(&node0, dc, EP_CLIENT).context("cannot bind the client")?;
    for ep in [EP_LOCAL_SERVER, EP_REMOTE_SERVER] {
        client
            .wait_for_bind(ep, Timeout::Millis(5000))
            .with_context(|| format!("bench server ep {ep} not visible from node0"))?;
    }
    let mut buf = vec![0u8; BLOCK];

    progress("dvs sendrec, local");
    let sendrec_local = sendrec_latency(&mut client, EP_LOCAL_SERVER, warmup, n)?;
    progress("dvs sendrec, remote");
    let sendrec_remote = sendrec_latency(&mut client, EP_REMOTE_SERVER, warmup, n)?;
    progress("dvs send, local");
    let send_local_msgs_s = send_rate(&mut client, EP_LOCAL_SERVER, warmup, n)?;
    progress("dvs send, remote");
    let send_remote_msgs_s = send_rate(&mut client, EP_REMOTE_SERVER, warmup, n)?;
    progress("dvs vcopy, local");
    let vcopy_local_mb_s = vcopy_rate(&mut client, EP_LOCAL_SERVER, &mut buf, bulk_mib)?;
    progress("dvs vcopy, remote");
    let vcopy_remote_mb_s = vcopy_rate(&mut client, EP_REMOTE_SERVER, &mut buf, bulk_mib)?;

    local.stop(&mut client)?;
    remote.stop(&mut client)?;
    Ok(Dvs {
        sendrec_local,
        sendrec_remote,
        send_local_msgs_s,
        send_remote_msgs_s,
        vcopy_local_mb_s,
        vcopy_remote_mb_s,
    })
}

fn sendrec_latency(client: &mut Endpoint, server: Ep, warmup: usize, n: usize) -> Result<Latency> {
    sendrec_samples(client, server, warmup, n).map(Latency::from_samples)
}

/// Endpoint of the remote server of the TLS comparison.
const EP_CMP_SERVER: Ep = 3;
/// Endpoint of the client of the TLS comparison.
const EP_CMP_CLIENT: Ep = 11;
/// Alternating blocks of the TLS comparison.
const CMP_BLOCKS: usize = 6;

/// Remote sendrec and vcopy on a TLS cluster and a plaintext cluster, in alternating blocks.
fn tls_vs_plaintext(
    tls: &ClusterConfig,
    plain: &ClusterConfig,
    warmup: usize,
    n: usize,
    bulk_mib: usize,
) -> Result<TlsCost> {
    struct Side {
        server: Server,
        client: Endpoint,
        samples: Vec<u64>,
        bytes: usize,
        secs: f64,
    }
    let setup = |cfg: &ClusterConfig| -> Result<Side> {
        let dc = cfg.dcs.first().context("the bench cluster has no DC")?.id;
        let server = Server::start(&cfg.nodes[1].ipc_socket(), dc, EP_CMP_SERVER)?;
        let mut client = Endpoint::bind_at(cfg.nodes[0].ipc_socket(), dc, EP_CMP_CLIENT)
            .context("cannot bind the comparison client")?;
        client
            .wait_for_bind(EP_CMP_SERVER, Timeout::Millis(5000))
            .context("comparison server not visible")?;
        Ok(Side {
            server,
            client,
            samples: Vec::new(),
            bytes: 0,
            secs: 0.0,
        })
    };
    let mut sides = [setup(tls)?, setup(plain)?];
    let mut buf = vec![0u8; BLOCK];
    let per_block = n.div_ceil(CMP_BLOCKS);
    let mib_per_block = bulk_mib.div_ceil(CMP_BLOCKS).max(1);
    progress("remote sendrec and vcopy, TLS and plaintext in alternating blocks");
    for block in 0..CMP_BLOCKS {
        // Alternate which side goes first, too.
        let order = if block % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let s = &mut sides[i];
            let w = if block == 0 { warmup } else { 0 };
            s.samples
                .extend(sendrec_samples(&mut s.client, EP_CMP_SERVER, w, per_block)?);
            let rate = vcopy_rate(&mut s.client, EP_CMP_SERVER, &mut buf, mib_per_block)?;
            s.bytes += mib_per_block * BLOCK;
            s.secs += (mib_per_block * BLOCK) as f64 / (rate * 1e6);
        }
    }
    let [mut t, mut p] = sides;
    let vcopy_tls_mb_s = t.bytes as f64 / t.secs / 1e6;
    let vcopy_plain_mb_s = p.bytes as f64 / p.secs / 1e6;
    let sendrec_tls = Latency::from_samples(std::mem::take(&mut t.samples));
    let sendrec_plain = Latency::from_samples(std::mem::take(&mut p.samples));
    t.server.stop(&mut t.client)?;
    p.server.stop(&mut p.client)?;
    Ok(TlsCost {
        blocks: CMP_BLOCKS,
        sendrec_tls,
        sendrec_plain,
        vcopy_tls_mb_s,
        vcopy_plain_mb_s,
    })
}

// ----- output --------------------------------------------------------------------------------

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The 1-, 5- and 15-minute load averages.
pub(crate) fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The CPU model, from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn print_table(r: &IpcReport) {
    let s = &r.setup;
    println!("dvs bench ipc");
    println!(
        "  {} CPUs ({}), kernel {}, load {} before / {} after",
        s.cpus, s.cpu_model, s.kernel, s.loadavg_before, s.loadavg_after
    );
    println!(
        "  {} round trips per latency test after {} warm-up; {} MiB per bandwidth test in {} KiB blocks; MB = 10^6 bytes",
        s.iterations,
        s.warmup,
        s.bulk_mib,
        s.block_bytes / 1024
    );
    println!("  {}", s.method);
    let busy = |l: &str| {
        l.split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.5)
    };
    if busy(&s.loadavg_before) || busy(&s.loadavg_after) {
        println!(
            "  note: 1-minute load average above 0.5 (other work, or runs just before this one): \
             figures may be noisy"
        );
    }
    println!();
    let lat = |name: &str, l: &Latency| {
        println!(
            "  {name:<34} {:>9.1} µs {:>9.1} µs {:>9.1} µs",
            l.median_us, l.p99_us, l.mean_us
        );
    };
    println!(
        "  {:<34} {:>12} {:>12} {:>12}",
        "round trip (64-byte messages)", "median", "p99", "mean"
    );
    lat("raw Unix socket ping-pong", &r.raw.unix_rtt);
    lat("dvs sendrec, local", &r.dvs.sendrec_local);
    lat("raw TCP loopback ping-pong, NODELAY", &r.raw.tcp_rtt);
    lat("dvs sendrec, remote (node0->node1)", &r.dvs.sendrec_remote);
    println!();
    println!("  throughput");
    let rate = |name: &str, v: f64, unit: &str| println!("  {name:<34} {v:>12.0} {unit}");
    rate(
        "raw Unix ping-pong (1 / median)",
        1e6 / r.raw.unix_rtt.median_us,
        "msgs/s",
    );
    rate("dvs send, local", r.dvs.send_local_msgs_s, "msgs/s");
    rate(
        "raw TCP ping-pong (1 / median)",
        1e6 / r.raw.tcp_rtt.median_us,
        "msgs/s",
    );
    rate("dvs send, remote", r.dvs.send_remote_msgs_s, "msgs/s");
    rate(
        "raw TCP stream, 1 MiB writes",
        r.raw.tcp_stream_mb_s,
        "MB/s",
    );
    rate("dvs vcopy 1 MiB, local", r.dvs.vcopy_local_mb_s, "MB/s");
    rate("dvs vcopy 1 MiB, remote", r.dvs.vcopy_remote_mb_s, "MB/s");
    println!();
    println!(
        "  peer-link TLS against plaintext ({} alternating blocks each)",
        r.tls.blocks
    );
    lat("dvs sendrec, remote, plaintext", &r.tls.sendrec_plain);
    lat("dvs sendrec, remote, mutual TLS", &r.tls.sendrec_tls);
    rate(
        "dvs vcopy 1 MiB, remote, plaintext",
        r.tls.vcopy_plain_mb_s,
        "MB/s",
    );
    rate("dvs vcopy 1 MiB, remote, TLS", r.tls.vcopy_tls_mb_s, "MB/s");
    println!();
    println!("  targets");
    for t in &r.targets {
        let shown = if t.target.ends_with('%') {
            format!("{:.0}%", t.ratio * 100.0)
        } else {
            format!("{:.2}x", t.ratio)
        };
        println!(
            "  {:<42} {:>8}  (target {:<7}) {}",
            t.name,
            shown,
            t.target,
            if t.pass { "PASS" } else { "MISS" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let l = Latency::from_samples((1..=100).rev().map(|v| v * 1000).collect());
        assert_eq!(l.samples, 100);
        assert_eq!(l.median_us, 50.0);
        assert_eq!(l.p99_us, 99.0);
        assert_eq!(l.min_us, 1.0);
        assert_eq!(l.mean_us, 50.5);
        let empty = Latency::from_samples(Vec::new());
        assert_eq!(empty.samples, 0);
        assert_eq!(empty.median_us, 0.0);
    }

    #[test]
    fn raw_baselines_run() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = raw_pingpong(a, b, 2, 10).unwrap();
        assert_eq!(l.samples, 10);
        let (a, b) = tcp_pair().unwrap();
        assert_eq!(raw_pingpong(a, b, 2, 10).unwrap().samples, 10);
        assert!(raw_tcp_stream(2).unwrap() > 0.0);
    }
}
