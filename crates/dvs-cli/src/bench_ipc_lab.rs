//! `dvs bench ipc --lab`: the IPC bench with the remote server on another host of a fresh
//! 3-host lab with etcd, beside the same figures on a single-machine cluster with the
//! embedded directory, measured in the same run in alternating blocks (so that both see the
//! same machine noise), each with its raw TCP baselines.
//!
//! The lab is reachable only inside its namespaces, so the bench runs on host1
//! (`--lab-inner`). A process binds endpoints only on its own host's node, so the servers are
//! processes of their own (`dvs bench ipc-serve`) launched with `dvs run` (relayed by host1's
//! node to host2's). The remote server also serves the raw TCP baselines on its host's
//! address, so the lab's raw figures cross the same veths and bridge. The single-machine
//! cluster (2 node kernels on host1's loopback) is driven the same way: same processes,
//! same client, only the network and the directory differ.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dvs_config::{ClusterConfig, NodeConfig};
use m3ipc::{DcId, Endpoint, Ep, Timeout};
use serde::Serialize;

use crate::bench::{cpu_model, loadavg, IpcOptions, Latency};
use crate::bench_lab::load_text;
use crate::bench_serve::{
    send_rate, sendrec_samples, stop_server, vcopy_rate, BLOCK, RAW_MSG, RAW_PINGPONG, RAW_STREAM,
};
use crate::harness::{launch, with_cluster};
use crate::helpers::progress;

/// Alternating blocks per cluster.
const BLOCKS: usize = 6;
/// Endpoint of the server on the client's node.
const EP_LOCAL_SERVER: Ep = 1;
/// Endpoint of the server on the other node (another host on the lab).
const EP_REMOTE_SERVER: Ep = 2;
/// Endpoint of the client.
const EP_CLIENT: Ep = 10;
/// Port of the remote server's raw TCP baselines, on its node's address.
const RAW_PORT: u16 = 7790;
/// First peer port tried for the single-machine cluster.
const BENCH_BASE_PORT: u16 = 7700;
/// Longest wait for a launched server's endpoint.
const BIND_TIMEOUT_MS: u32 = 10_000;

/// The figures of one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Raw TCP ping-pong of 64-byte messages, `TCP_NODELAY`, client to the remote server's
    /// process (loopback on one machine; host1 to host2 on the lab).
    pub raw_tcp_rtt: Latency,
    /// Median of each block's raw TCP round trips, µs: how steady the baseline was (on this
    /// VM a ping-pong's wake-ups cost much more when its two threads land on different CPUs).
    pub raw_tcp_rtt_block_medians_us: Vec<f64>,
    /// Median of each block's remote sendrec round trips, µs.
    pub sendrec_remote_block_medians_us: Vec<f64>,
    /// Raw TCP stream of 1 MiB writes to the remote server's process, MB/s.
    pub raw_tcp_stream_mb_s: f64,
    /// sendrec round trip, server on the other node.
    pub sendrec_remote: Latency,
    /// sendrec round trip, server on the client's node.
    pub sendrec_local: Latency,
    /// Rendezvous sends per second, other node.
    pub send_remote_msgs_s: f64,
    /// Rendezvous sends per second, client's node.
    pub send_local_msgs_s: f64,
    /// vcopy of 1 MiB blocks from the remote server into the client, MB/s.
    pub vcopy_remote_mb_s: f64,
    /// The same from the server on the client's node, MB/s.
    pub vcopy_local_mb_s: f64,
}

/// The report of `dvs bench ipc --lab`.
#[derive(Debug, Clone, Serialize)]
pub struct IpcLabReport {
    /// How the run was set up.
    pub method: String,
    /// CPUs, model.
    pub machine: String,
    /// /proc/loadavg before.
    pub loadavg_before: String,
    /// /proc/loadavg after.
    pub loadavg_after: String,
    /// Measured round trips per latency test and cluster.
    pub iterations: usize,
    /// Unmeasured round trips before each latency test (first block only).
    pub warmup: usize,
    /// MiB per bandwidth test and cluster.
    pub bulk_mib: usize,
    /// Alternating blocks per cluster.
    pub blocks: usize,
    /// Single machine: 2 node kernels on loopback, embedded directory.
    pub local: Figures,
    /// 3-host lab: client on host1, remote server on host2, etcd over TLS.
    pub lab: Figures,
}

/// `dvs bench ipc --lab`: a fresh lab, the bench on its host1, the lab taken down.
pub fn ipc_lab(o: &IpcOptions) -> Result<ExitCode> {
    check(o)?;
    let args = [
        "--iterations".to_string(),
        o.iterations.to_string(),
        "--bulk-mib".into(),
        o.bulk_mib.to_string(),
    ];
    crate::demo_lab::bench_on_lab("ipc", "ipc", &args, o.json)
}

fn check(o: &IpcOptions) -> Result<()> {
    if o.iterations == 0 || o.bulk_mib == 0 {
        bail!("--iterations and --bulk-mib must be at least 1");
    }
    Ok(())
}

/// `dvs bench ipc --lab-inner`: on a lab host, with the lab's cluster `lab`.
pub fn ipc_inner(lab: &ClusterConfig, o: &IpcOptions) -> Result<ExitCode> {
    check(o)?;
    if lab.nodes.len() < 2 {
        bail!("the lab's cluster needs 2 nodes");
    }
    let before = loadavg();
    let n = o.iterations as usize;
    let warmup = (n / 10).clamp(100, 2000);
    let bulk = o.bulk_mib as usize;
    let dir = std::env::temp_dir().join(format!("dvs-bench-ipc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    progress(&format!(
        "starting a 2-node single-machine cluster (embedded directory) under {} on this host",
        dir.display()
    ));
    let (local, lab) = with_cluster(&dir, 2, BENCH_BASE_PORT, true, |local| {
        let mut sides = [Side::start(local)?, Side::start(lab)?];
        let per_block = n.div_ceil(BLOCKS);
        let mib_per_block = bulk.div_ceil(BLOCKS);
        let mut buf = vec![0u8; BLOCK];
        for block in 0..BLOCKS {
            progress(&format!(
                "block {}/{BLOCKS}: both clusters, one after the other",
                block + 1
            ));
            // Alternate which cluster goes first, too.
            let order = if block % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let w = if block == 0 { warmup } else { 0 };
                sides[i].block(w, per_block, mib_per_block, &mut buf)?;
            }
        }
        let [mut l, mut b] = sides;
        Ok((l.finish()?, b.finish()?))
    })?;
    let report = IpcLabReport {
        method: format!(
            "client in this process on the first node; servers are `dvs bench ipc-serve` \
             processes launched with `dvs run`, one on the client's node (local) and one on \
             the second node (remote), which also serves the raw TCP baselines; single \
             machine = 2 node kernels on one host's loopback with the embedded directory; \
             lab = client on host1, remote server on host2 (own network and mount namespaces, \
             veths on a bridge), etcd over client-cert TLS; mutual TLS on the peer links of \
             both; {BLOCKS} alternating blocks per cluster"
        ),
        machine: format!(
            "{} CPUs ({})",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model()
        ),
        loadavg_before: before,
        loadavg_after: loadavg(),
        iterations: n.div_ceil(BLOCKS) * BLOCKS,
        warmup,
        bulk_mib: bulk.div_ceil(BLOCKS) * BLOCKS,
        blocks: BLOCKS,
        local,
        lab,
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// An amount (messages, bytes) over the time it took, summed over blocks.
#[derive(Default)]
struct Rate {
    amount: f64,
    secs: f64,
}

impl Rate {
    fn add(&mut self, amount: f64, per_sec: f64) {
        self.amount += amount;
        self.secs += amount / per_sec;
    }

    fn per_sec(&self) -> f64 {
        self.amount / self.secs
    }
}

/// One cluster under test: its client, servers and what was measured so far.
struct Side {
    client: Endpoint,
    /// The remote server's raw TCP address.
    raw: SocketAddr,
    /// The ping-pong connection, open for the whole run (as the peer link is).
    pingpong: TcpStream,
    raw_rtt: Vec<u64>,
    raw_rtt_blocks: Vec<f64>,
    sendrec_remote: Vec<u64>,
    sendrec_remote_blocks: Vec<f64>,
    sendrec_local: Vec<u64>,
    send_remote: Rate,
    send_local: Rate,
    raw_stream: Rate,
    vcopy_remote: Rate,
    vcopy_local: Rate,
}

impl Side {
    /// Launches the two servers on `cfg` (the remote one with its raw side) and binds the
    /// client.
    fn start(cfg: &ClusterConfig) -> Result<Side> {
        let dc = cfg.dcs.first().context("the cluster has no DC")?.id;
        let (near, far) = (&cfg.nodes[0], &cfg.nodes[1]);
        let raw = SocketAddr::new(far.peer_addr.ip(), RAW_PORT);
        let exe = std::env::current_exe().context("cannot find the dvs executable")?;
        let serve = |node: &NodeConfig, ep: Ep, raw: Option<SocketAddr>| -> Result<()> {
            let mut cmd = vec![
                exe.display().to_string(),
                "bench".into(),
                "ipc-serve".into(),
            ];
            if let Some(a) = raw {
                cmd.extend(["--raw".into(), a.to_string()]);
            }
            launch(cfg, node, dc, ep, cmd)
        };
        serve(far, EP_REMOTE_SERVER, Some(raw))?;
        serve(near, EP_LOCAL_SERVER, None)?;
        let mut client = Endpoint::bind_at(near.ipc_socket(), dc, EP_CLIENT)
            .context("cannot bind the client")?;
        for (ep, node) in [(EP_REMOTE_SERVER, far), (EP_LOCAL_SERVER, near)] {
            wait_bound(&mut client, dc, ep, node)?;
        }
        let mut pingpong = TcpStream::connect_timeout(&raw, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to the raw server at {raw}"))?;
        pingpong.set_nodelay(true)?;
        pingpong.write_all(&[RAW_PINGPONG])?;
        Ok(Side {
            client,
            raw,
            pingpong,
            raw_rtt: Vec::new(),
            raw_rtt_blocks: Vec::new(),
            sendrec_remote: Vec::new(),
            sendrec_remote_blocks: Vec::new(),
            sendrec_local: Vec::new(),
            send_remote: Rate::default(),
            send_local: Rate::default(),
            raw_stream: Rate::default(),
            vcopy_remote: Rate::default(),
            vcopy_local: Rate::default(),
        })
    }

    /// One block of every test: `n` round trips and sends (after `warmup`), `mib` MiB.
    fn block(&mut self, warmup: usize, n: usize, mib: usize, buf: &mut [u8]) -> Result<()> {
        let c = &mut self.client;
        let raw = raw_pingpong(&mut self.pingpong, warmup, n).context("raw TCP ping-pong")?;
        self.raw_rtt_blocks
            .push(Latency::from_samples(raw.clone()).median_us);
        self.raw_rtt.extend(raw);
        let remote = sendrec_samples(c, EP_REMOTE_SERVER, warmup, n)?;
        self.sendrec_remote_blocks
            .push(Latency::from_samples(remote.clone()).median_us);
        self.sendrec_remote.extend(remote);
        self.sendrec_local
            .extend(sendrec_samples(c, EP_LOCAL_SERVER, warmup, n)?);
        let n_f = n as f64;
        self.send_remote
            .add(n_f, send_rate(c, EP_REMOTE_SERVER, warmup, n)?);
        self.send_local
            .add(n_f, send_rate(c, EP_LOCAL_SERVER, warmup, n)?);
        let bytes = (mib * BLOCK) as f64;
        self.raw_stream.add(
            bytes,
            raw_stream(self.raw, mib * BLOCK).context("raw TCP stream")?,
        );
        // vcopy_rate gives MB/s.
        self.vcopy_remote
            .add(bytes, vcopy_rate(c, EP_REMOTE_SERVER, buf, mib)? * 1e6);
        self.vcopy_local
            .add(bytes, vcopy_rate(c, EP_LOCAL_SERVER, buf, mib)? * 1e6);
        Ok(())
    }

    /// Stops the servers and summarizes.
    fn finish(&mut self) -> Result<Figures> {
        for ep in [EP_REMOTE_SERVER, EP_LOCAL_SERVER] {
            stop_server(&mut self.client, ep)?;
        }
        let take = |v: &mut Vec<u64>| Latency::from_samples(std::mem::take(v));
        Ok(Figures {
            raw_tcp_rtt: take(&mut self.raw_rtt),
            raw_tcp_rtt_block_medians_us: std::mem::take(&mut self.raw_rtt_blocks),
            sendrec_remote_block_medians_us: std::mem::take(&mut self.sendrec_remote_blocks),
            raw_tcp_stream_mb_s: self.raw_stream.per_sec() / 1e6,
            sendrec_remote: take(&mut self.sendrec_remote),
            sendrec_local: take(&mut self.sendrec_local),
            send_remote_msgs_s: self.send_remote.per_sec(),
            send_local_msgs_s: self.send_local.per_sec(),
            vcopy_remote_mb_s: self.vcopy_remote.per_sec() / 1e6,
            vcopy_local_mb_s: self.vcopy_local.per_sec() / 1e6,
        })
    }
}

/// Waits until `ep` (launched on `node`) is visible to the client.
fn wait_bound(client: &mut Endpoint, dc: DcId, ep: Ep, node: &NodeConfig) -> Result<()> {
    client
        .wait_for_bind(ep, Timeout::Millis(BIND_TIMEOUT_MS))
        .with_context(|| {
            format!(
                "bench server {dc}/{ep} did not come up on {} (see {})",
                node.name,
                node.runtime_dir.join("logs").display()
            )
        })
}

/// Ping-pong of [`RAW_MSG`]-byte messages on `s` (echoed by `ipc-serve`): `n` round trips
/// after `warmup`, in nanoseconds.
fn raw_pingpong(s: &mut TcpStream, warmup: usize, n: usize) -> Result<Vec<u64>> {
    let mut buf = [0x5au8; RAW_MSG];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(samples)
}

/// Streams `total` bytes in 1 MiB writes over a fresh connection to `ipc-serve` at `addr`;
/// bytes per second from the first write to its one-byte acknowledgement of the last byte
/// (as `dvs bench ipc`'s raw stream).
fn raw_stream(addr: SocketAddr, total: usize) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.write_all(&[RAW_STREAM])?;
    s.write_all(&(total as u64).to_le_bytes())?;
    let block: Vec<u8> = (0..BLOCK).map(|i| (i * 7) as u8).collect();
    let t = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(BLOCK);
        s.write_all(&block[..n])?;
        left -= n;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

fn print(r: &IpcLabReport) {
    println!();
    println!("dvs bench ipc --lab");
    println!("  {}", r.method);
    println!(
        "  {}, {}",
        r.machine,
        load_text(&r.loadavg_before, &r.loadavg_after)
    );
    println!(
        "  per cluster: {} round trips per latency test after {} warm-up, {} MiB per bandwidth \
         test in {} KiB blocks; MB = 10^6 bytes",
        r.iterations,
        r.warmup,
        r.bulk_mib,
        BLOCK / 1024
    );
    println!();
    let head = |what: &str| {
        println!(
            "  {what:<38} {:>24} {:>24} {:>10}",
            "1 machine, embedded", "3-host lab, etcd", "lab / 1"
        )
    };
    let lat = |name: &str, a: &Latency, b: &Latency| {
        println!(
            "  {name:<38} {:>24} {:>24} {:>9.2}x",
            format!("{:.1} / {:.1}", a.median_us, a.p99_us),
            format!("{:.1} / {:.1}", b.median_us, b.p99_us),
            b.median_us / a.median_us
        )
    };
    let rate =
        |name: &str, a: f64, b: f64| println!("  {name:<38} {a:>24.0} {b:>24.0} {:>9.2}x", b / a);
    let (l, b) = (&r.local, &r.lab);
    head("round trip, µs median / p99");
    lat("raw TCP ping-pong, NODELAY", &l.raw_tcp_rtt, &b.raw_tcp_rtt);
    lat("dvs sendrec, remote", &l.sendrec_remote, &b.sendrec_remote);
    lat("dvs sendrec, local", &l.sendrec_local, &b.sendrec_local);
    println!();
    head("throughput, msgs/s");
    rate(
        "raw TCP ping-pong (1 / median)",
        1e6 / l.raw_tcp_rtt.median_us,
        1e6 / b.raw_tcp_rtt.median_us,
    );
    rate(
        "dvs send, remote",
        l.send_remote_msgs_s,
        b.send_remote_msgs_s,
    );
    rate("dvs send, local", l.send_local_msgs_s, b.send_local_msgs_s);
    println!();
    head("bandwidth, MB/s");
    rate(
        "raw TCP stream, 1 MiB writes",
        l.raw_tcp_stream_mb_s,
        b.raw_tcp_stream_mb_s,
    );
    rate(
        "dvs vcopy 1 MiB, remote",
        l.vcopy_remote_mb_s,
        b.vcopy_remote_mb_s,
    );
    rate(
        "dvs vcopy 1 MiB, local",
        l.vcopy_local_mb_s,
        b.vcopy_local_mb_s,
    );
    println!();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.1}-{hi:.1}")
    };
    println!("  medians of the {} blocks, µs (lowest-highest)", r.blocks);
    for (what, f) in [("1 machine", l), ("lab", b)] {
        println!(
            "  {what:<10} raw TCP RTT {}, dvs sendrec remote {}",
            range(&f.raw_tcp_rtt_block_medians_us),
            range(&f.sendrec_remote_block_medians_us)
        );
    }
    println!();
    println!("  dvs against its own cluster's raw baseline");
    for (what, f) in [("1 machine", l), ("lab", b)] {
        println!(
            "  {what:<10} remote sendrec / raw TCP RTT {:.2}x, remote vcopy / raw TCP stream {:.0}%",
            f.sendrec_remote.median_us / f.raw_tcp_rtt.median_us,
            100.0 * f.vcopy_remote_mb_s / f.raw_tcp_stream_mb_s
        );
    }
}
