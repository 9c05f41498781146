//! `dvs bench failover`: how long the surviving nodes take to see a node fail, on a fresh
//! 3-host lab with etcd.
//!
//! Two failures, `--trials` times each: the node kernel of host3 is killed with SIGKILL
//! (then started again), and host3's network is cut (`ip link set eth0 down` in its
//! namespace, then up again). A watcher on host1 (`--watch node3`) polls the status of
//! every other node (host2's through host1's node, over the peer link) every few
//! milliseconds and stamps, on the machine-wide monotonic clock, the moment each one
//! reports its link to node3 down, then waits until every link is up again. Detection = the
//! last survivor's stamp minus the moment of the failure.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::ClusterConfig;
use serde::Serialize;

use crate::bench::{cpu_model, loadavg};
use crate::bench_lab::load_text;
use crate::harness::Stats;
use crate::helpers::progress;
use crate::helpers::{find_node, node_status};
use crate::lab::{self, LabState};

/// The host whose node fails (index in the lab's hosts) and its node.
const VICTIM: usize = 2;
const VICTIM_NODE: &str = "node3";
/// Longest wait for the survivors to see the failure, and for the links to come back.
const DETECT_LIMIT: Duration = Duration::from_secs(30);
const RECOVER_LIMIT: Duration = Duration::from_secs(60);
/// How often the watcher asks each survivor.
const POLL: Duration = Duration::from_millis(5);
/// The target: median detection at most this, in milliseconds.
const TARGET_MS: f64 = 3000.0;

/// The figures of one kind of failure.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// What failed.
    pub what: String,
    /// Failure to the last survivor reporting the link down, per trial, in milliseconds.
    pub detect_ms: Vec<f64>,
    /// Summary of `detect_ms`.
    pub detect: Stats,
    /// Repair (restart, link up) to every link up again, in milliseconds.
    pub recover: Stats,
}

/// The machine's monotonic clock, in nanoseconds: the same in every namespace of the lab.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `dvs bench failover`.
pub fn failover(trials: u32, json: bool) -> Result<ExitCode> {
    if trials == 0 {
        bail!("--trials must be at least 1");
    }
    let before = loadavg();
    progress("starting a 3-host lab with etcd");
    let mut results = Vec::new();
    let code = crate::demo_lab::with_lab("fail", |lab| {
        progress(&format!(
            "lab {} up; {trials} trials per failure of {VICTIM_NODE}",
            lab.name
        ));
        for kill in [true, false] {
            results.push(measure(lab, kill, trials)?);
        }
        Ok(ExitCode::SUCCESS)
    })?;
    let after = loadavg();
    let machine = format!(
        "{} CPUs ({}), {}",
        thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model(),
        load_text(&before, &after)
    );
    if json {
        let v = serde_json::json!({ "machine": machine, "failures": results });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    println!();
    println!("dvs bench failover");
    println!(
        "  3-host lab with etcd, default link settings (heartbeat 250 ms, dead after 1500 ms); \
         a watcher on host1 polls node1 and node2 (through node1) every {} ms; detection = \
         failure to the last of them reporting its link to {VICTIM_NODE} down",
        POLL.as_millis()
    );
    println!("  {machine}");
    println!();
    println!(
        "{:<40} {:>6}  {:>22}  {:>22}",
        "failure", "trials", "detection ms", "recovery ms"
    );
    println!(
        "{:<40} {:>6}  {:>22}  {:>22}",
        "", "", "median / max", "median / max"
    );
    for r in &results {
        println!(
            "{:<40} {:>6}  {:>22}  {:>22}",
            r.what,
            r.detect.n,
            format!("{:.0} / {:.0}", r.detect.median, r.detect.max),
            format!("{:.0} / {:.0}", r.recover.median, r.recover.max)
        );
    }
    println!();
    for r in &results {
        println!(
            "target: {} detected in <= {:.0} s (median): {:.2} s {}",
            r.what,
            TARGET_MS / 1e3,
            r.detect.median / 1e3,
            if r.detect.n > 0 && r.detect.median <= TARGET_MS {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
    Ok(code)
}

/// `trials` failures of one kind (`kill`: SIGKILL of the node kernel; else the network
/// cut), each repaired before the next.
fn measure(lab: &mut LabState, kill: bool, trials: u32) -> Result<Failure> {
    let what = if kill {
        format!("kill -9 of {VICTIM_NODE}'s kernel")
    } else {
        "host3's network cut (eth0 down)".to_string()
    };
    let mut detect = Vec::new();
    let mut recover = Vec::new();
    for t in 0..trials {
        let host1 = lab.host("host1")?.clone();
        let mut child = lab::cli_on(&host1, &["bench", "failover", "--watch", VICTIM_NODE])?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the watcher on host1")?;
        let lines = lines_of(child.stdout.take().expect("piped"));
        let r = trial(lab, kill, &lines);
        let _ = child.kill();
        let _ = child.wait();
        let (d, rec) = r.with_context(|| format!("{what}, trial {}", t + 1))?;
        eprintln!(
            "  {what:<36} {:>2}/{trials}  detected in {d:>6.0} ms, links up again {rec:>6.0} ms after the repair",
            t + 1
        );
        detect.push(d);
        recover.push(rec);
    }
    Ok(Failure {
        what,
        detect: Stats::of(&detect),
        recover: Stats::of(&recover),
        detect_ms: detect,
    })
}

/// The lines a reader yields, through a channel (so that they can be awaited with a limit).
fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// The watcher's next line, which must be `word` and a number (0 when it has none).
fn expect(lines: &mpsc::Receiver<String>, word: &str, limit: Duration) -> Result<u64> {
    let l = lines
        .recv_timeout(limit)
        .map_err(|_| anyhow!("the watcher said no {word:?} within {limit:?}"))?;
    l.strip_prefix(word)
        .and_then(|r| match r.trim() {
            "" => Some(0),
            n => n.parse().ok(),
        })
        .ok_or_else(|| anyhow!("the watcher said {l:?}, not {word:?}"))
}

/// One failure and its repair; (detection, recovery) in milliseconds.
fn trial(lab: &mut LabState, kill: bool, lines: &mpsc::Receiver<String>) -> Result<(f64, f64)> {
    expect(lines, "ready", RECOVER_LIMIT)?;
    let netns = lab.hosts[VICTIM].netns.clone();
    let failed_at = mono_ns();
    if kill {
        let pid = lab.hosts[VICTIM]
            .pid
            .ok_or_else(|| anyhow!("{VICTIM_NODE} has no pid"))?;
        // SAFETY: a signal to the node kernel this lab started.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            bail!("cannot kill {VICTIM_NODE} (pid {pid})");
        }
    } else {
        link(&netns, "down")?;
    }
    let down_at = expect(lines, "down", DETECT_LIMIT);
    let repaired_at = mono_ns();
    // Repair even when the failure went unseen, so that the lab is whole for the next trial.
    if kill {
        lab::start_node(lab, VICTIM)?;
    } else {
        link(&netns, "up")?;
    }
    let down_at = down_at?;
    let up_at = expect(lines, "up", RECOVER_LIMIT)?;
    Ok((
        down_at.saturating_sub(failed_at) as f64 / 1e6,
        up_at.saturating_sub(repaired_at) as f64 / 1e6,
    ))
}

/// `ip link set eth0 UPDOWN` inside namespace `netns` (a netlink request: nothing is sent on
/// the lab's network from here).
fn link(netns: &str, updown: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["-n", netns, "link", "set", "eth0", updown])
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} link set eth0 {updown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `dvs bench failover --watch NODE`, on a lab host: prints `ready` once every other node
/// reports its link to NODE up, `down T` once every one of them has reported it down (T: the
/// monotonic clock, in ns, when the last did), then `up T` once all are up again.
pub fn watch(cfg: &ClusterConfig, victim: &str) -> Result<ExitCode> {
    let victim = find_node(cfg, victim)?.id;
    let survivors: Vec<_> = cfg.nodes.iter().filter(|n| n.id != victim).collect();
    // Per survivor: whether its link to the victim is up (None: no answer).
    let links = || -> Vec<Option<bool>> {
        survivors
            .iter()
            .map(|n| {
                node_status(cfg, n)
                    .ok()
                    .and_then(|s| s.links.iter().find(|l| l.node == victim).map(|l| l.up))
            })
            .collect()
    };
    let say = |what: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{what}");
        let _ = out.flush();
    };
    while !links().iter().all(|l| *l == Some(true)) {
        thread::sleep(POLL);
    }
    say("ready".into());
    let mut seen: Vec<Option<u64>> = vec![None; survivors.len()];
    while seen.iter().any(Option::is_none) {
        let now = links();
        let t = mono_ns();
        for (s, l) in seen.iter_mut().zip(now) {
            if s.is_none() && l == Some(false) {
                *s = Some(t);
            }
        }
        thread::sleep(POLL);
    }
    say(format!(
        "down {}",
        seen.iter().flatten().max().unwrap_or(&0)
    ));
    while !links().iter().all(|l| *l == Some(true)) {
        thread::sleep(POLL);
    }
    say(format!("up {}", mono_ns()));
    Ok(ExitCode::SUCCESS)
}
