//! The migration harness shared by `dvs demo` and `dvs bench migration`.
//!
//! It drives the paper's test on a running cluster: a `migr-server` (with a few MiB of
//! ballast, so that its checkpoint image has the paper's size) serves a `migr-client`
//! launched in a thread; once the client has done some of its requests (it says so every 100
//! in its output, which the node streams to the harness: this works from any host of a
//! cluster, the server's log would be readable only on the server's host) the server is
//! migrated, the client is joined and its JSON report checked (every iteration ok, none
//! lost, duplicated or corrupt, the server's counter continuing where the previous client
//! left it), and the server must run where the migration's outcome says.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dvs_config::{ClusterConfig, NodeConfig};
use dvs_node::ctl::{CtlRequest, CtlResponse, MigrationReport, Phase};
use m3ipc::{DcId, Ep};
use serde::Serialize;

use crate::cluster;
use crate::helpers::{ctl_connect, nearest_rank, node_name, running_on, wait_until, ClusterGuard};
use crate::migrate::{run_migration, MigrateOptions};

/// MiB of heap the migrating server fills, for a checkpoint image of about the paper's 2.5 MB.
pub const BALLAST_MB: u32 = 2;
/// Endpoint of the first migrating server.
pub const EP_SERVER: Ep = 1;
/// First endpoint of the clients: each client run takes the next one.
const EP_FIRST_CLIENT: Ep = 10;
/// Number of client endpoints used in turn.
const CLIENT_EPS: u32 = 200;
/// The client reports its progress every this many iterations.
const PROGRESS_EVERY: u32 = 100;
/// Longest wait for the server to serve part of a client run before migrating anyway.
const MID_RUN_WAIT: Duration = Duration::from_secs(10);
// ----- the cluster ---------------------------------------------------------------------------

/// Starts a `nodes`-node cluster under `dir`, runs `f`, and always stops the cluster
/// afterwards (also on error, panic, SIGINT or SIGTERM); removes `dir` when `remove` is set.
pub fn with_cluster<T>(
    dir: &Path,
    nodes: u16,
    base_port: u16,
    remove: bool,
    f: impl FnOnce(&ClusterConfig) -> Result<T>,
) -> Result<T> {
    // Before any other thread starts (see ClusterGuard::new).
    let guard = ClusterGuard::new(remove.then(|| dir.to_path_buf()))?;
    let cfg = guard
        .start(|| cluster::start(dir, nodes, base_port, false))
        .context("cannot start the cluster")?;
    let r = f(&cfg);
    drop(guard);
    r
}

/// Whether the criu backend works on `node` (its `dvs doctor` check), with the detail.
pub fn criu_on(cfg: &ClusterConfig, node: &NodeConfig) -> (bool, String) {
    let answer = ctl_connect(cfg, node, Duration::from_secs(30))
        .and_then(|mut c| c.call(&CtlRequest::Doctor));
    match answer {
        Ok(CtlResponse::Doctor { checks }) => checks
            .into_iter()
            .find(|c| c.name == "criu")
            .map(|c| (c.ok, c.detail))
            .unwrap_or((false, "the node did not check criu".into())),
        Ok(other) => (false, format!("unexpected answer: {other:?}")),
        Err(e) => (false, format!("{e:#}")),
    }
}

/// Launches `cmd` as endpoint `ep` of `dc` on `node`, detached.
pub fn launch(
    cfg: &ClusterConfig,
    node: &NodeConfig,
    dc: DcId,
    ep: Ep,
    cmd: Vec<String>,
) -> Result<()> {
    let mut c = ctl_connect(cfg, node, Duration::from_secs(10))?;
    match c.call(&CtlRequest::Run {
        dc,
        ep,
        cmd,
        wait: false,
        workdir: None,
    })? {
        CtlResponse::Started { .. } => Ok(()),
        other => bail!("cannot start endpoint {ep} on {}: {other:?}", node.name),
    }
}

// ----- one client run ------------------------------------------------------------------------

/// What a `migr-client --json` run reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientReport {
    /// Exit code (None: killed by a signal or never reported).
    pub code: Option<i32>,
    /// Iterations whose reply and block were right.
    pub ok: u64,
    /// Iterations with a wrong reply or block.
    pub corrupt: u64,
    /// Iterations without a valid answer.
    pub lost: u64,
    /// Iterations where the server's counter did not increase.
    pub duplicated: u64,
    /// Duration of the run, in seconds.
    pub seconds: f64,
    /// Longest single iteration, in milliseconds.
    pub max_stall_ms: f64,
    /// Server counter in the first reply.
    pub first_counter: Option<u64>,
    /// Server counter in the last reply.
    pub last_counter: Option<u64>,
    /// The client's other output lines (its complaints), first few.
    pub complaints: Vec<String>,
}

/// The progress line `migr-client --progress` writes: the iterations done.
fn progress_line(line: &str) -> Option<u64> {
    line.strip_prefix("migr-client: ")?
        .strip_suffix(" iterations done")?
        .parse()
        .ok()
}

/// Runs `cmd` as endpoint `ep` of `dc` on `node`, waits for it (killing it if it has not
/// ended after `limit`) and parses the JSON line of its output. Sets `done` to the
/// iterations its progress lines report, as they come.
fn run_client(
    cfg: &ClusterConfig,
    node: &NodeConfig,
    dc: DcId,
    ep: Ep,
    cmd: Vec<String>,
    limit: Duration,
    done: &AtomicU64,
) -> Result<ClientReport> {
    let mut c = ctl_connect(cfg, node, Duration::from_secs(10))?;
    let started = c.call(&CtlRequest::Run {
        dc,
        ep,
        cmd,
        wait: true,
        workdir: None,
    })?;
    let CtlResponse::Started { pid, log } = started else {
        bail!("cannot start the client on {}: {started:?}", node.name)
    };
    let deadline = Instant::now() + limit;
    let mut out = String::new();
    // Where the first line not yet scanned for progress starts (chunks split lines).
    let mut scanned = 0;
    let code = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        c.set_timeout(Some(left.max(Duration::from_millis(1))))?;
        match c.recv() {
            Ok(CtlResponse::Output { data }) => {
                out.push_str(&data);
                if let Some(end) = out.rfind('\n') {
                    if let Some(n) = out[scanned..end].lines().rev().find_map(progress_line) {
                        done.store(n, Ordering::Relaxed);
                    }
                    scanned = end + 1;
                }
            }
            Ok(CtlResponse::Exited { code, .. }) => break code,
            Ok(other) => bail!("unexpected answer: {other:?}"),
            Err(e) if Instant::now() >= deadline => {
                let _ = dvs_checkpoint::kill_tree(pid);
                bail!(
                    "the client hung: no end after {:.0} s ({e}); killed it (log {log}{})",
                    limit.as_secs_f64(),
                    out.lines()
                        .find(|l| !l.starts_with('{'))
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default()
                )
            }
            Err(e) => return Err(e).context("client output"),
        }
    };
    let mut r = ClientReport {
        code,
        ..ClientReport::default()
    };
    let mut json = None;
    for line in out.lines() {
        if line.starts_with('{') {
            json = serde_json::from_str::<serde_json::Value>(line).ok();
        } else if r.complaints.len() < 5 && !line.trim().is_empty() && progress_line(line).is_none()
        {
            r.complaints.push(line.to_string());
        }
    }
    let Some(j) = json else {
        bail!(
            "the client printed no report (exit {code:?}): {}",
            out.trim()
        )
    };
    let u = |k: &str| j[k].as_u64().unwrap_or(0);
    r.ok = u("ok");
    r.corrupt = u("corrupt");
    r.lost = u("lost");
    r.duplicated = u("duplicated");
    r.seconds = j["seconds"].as_f64().unwrap_or(0.0);
    r.max_stall_ms = j["max_stall_ms"].as_f64().unwrap_or(0.0);
    r.first_counter = j["first_counter"].as_u64();
    r.last_counter = j["last_counter"].as_u64();
    Ok(r)
}

// ----- the harness ---------------------------------------------------------------------------

/// A migrating `migr-server` and its checking clients on a running cluster.
pub struct Harness<'a> {
    cfg: &'a ClusterConfig,
    dc: DcId,
    dc_name: String,
    server_ep: Ep,
    server_bin: String,
    client_bin: String,
    /// Client iterations per run.
    pub iterations: u32,
    /// Bytes per client iteration (as `migr-client --block-size` takes it).
    pub block_size: String,
    /// `criu`, `cooperative`, or None for the node's default.
    pub backend: Option<String>,
    /// Server counter the next client should see first, when known.
    expected_first: Option<u64>,
    runs: u32,
    /// MiB of heap the server fills (its image size).
    pub ballast_mb: u32,
}

/// The outcome of one migration under load.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Source node.
    pub from: String,
    /// Destination node.
    pub to: String,
    /// Node of the client.
    pub client_node: String,
    /// The phase made to fail, for a rollback.
    pub fail_at: Option<String>,
    /// The migration's report (None if the migration could not be run).
    pub summary: Option<MigrationReport>,
    /// The client's report (None if it could not be read).
    pub client: Option<ClientReport>,
    /// Requests the client had done when the migration started (from its progress lines,
    /// one per 100).
    pub served_before: u64,
    /// Whether the client was still running when the migration started.
    pub mid_run: bool,
    /// What went wrong: lost, duplicated or corrupt iterations, a wrong outcome or placement.
    pub violations: Vec<String>,
}

impl<'a> Harness<'a> {
    /// A harness for the server `server_ep` of the cluster's first DC.
    pub fn new(
        cfg: &'a ClusterConfig,
        server_ep: Ep,
        iterations: u32,
        block_size: &str,
    ) -> Result<Self> {
        let dc = cfg
            .dcs
            .first()
            .ok_or_else(|| anyhow!("the cluster has no DC"))?;
        Ok(Harness {
            cfg,
            dc: dc.id,
            dc_name: dc.name.clone(),
            server_ep,
            server_bin: example_binary("migr-server")?.display().to_string(),
            client_bin: example_binary("migr-client")?.display().to_string(),
            iterations,
            block_size: block_size.to_string(),
            backend: None,
            expected_first: None,
            runs: 0,
            ballast_mb: BALLAST_MB,
        })
    }

    /// The node by id.
    pub fn node(&self, id: u16) -> Result<&'a NodeConfig> {
        self.cfg
            .node_by_id(id)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    /// Starts the server (with the ballast) on `node` and waits until it is bound.
    pub fn start_server(&mut self, node: u16) -> Result<()> {
        let n = self.node(node)?;
        launch(
            self.cfg,
            n,
            self.dc,
            self.server_ep,
            vec![
                self.server_bin.clone(),
                "--ballast-mb".into(),
                self.ballast_mb.to_string(),
            ],
        )?;
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
            self.server_node() == Some(node)
        });
        if !up {
            bail!(
                "migr-server did not come up on {} within 10 s (see {})",
                n.name,
                n.runtime_dir.join("logs").display()
            );
        }
        self.expected_first = None;
        Ok(())
    }

    /// The ids of the cluster's nodes, in config order.
    pub fn node_ids(&self) -> Vec<u16> {
        self.cfg.nodes.iter().map(|n| n.id).collect()
    }

    /// The node the server runs on (RUNNING there), if any.
    pub fn server_node(&self) -> Option<u16> {
        running_on(self.cfg, self.dc, self.server_ep).map(|n| n.id)
    }

    /// Launches a client on `client_node`, migrates the server to `to` once it has served
    /// part of the client's run (with `fail_at`: a migration made to fail), joins the client
    /// and checks everything. Errors only when the cluster cannot be driven at all.
    pub fn run_once(&mut self, client_node: u16, to: u16, fail_at: Option<&str>) -> Result<Sample> {
        let from = self
            .server_node()
            .ok_or_else(|| anyhow!("migr-server is not running on any node"))?;
        let cnode = self.node(client_node)?;
        let tnode = self.node(to)?;
        let client_ep = EP_FIRST_CLIENT + (self.runs % CLIENT_EPS) as Ep;
        self.runs += 1;
        // Migrate once 100 to 200 requests of this run are done (the client says so every
        // 100), or as soon as the client started for short runs.
        let step = match self.iterations {
            0..=199 => 0,
            200..=399 => 100,
            _ => 200,
        };
        let cmd = vec![
            self.client_bin.clone(),
            "--server".into(),
            self.server_ep.to_string(),
            "--iterations".into(),
            self.iterations.to_string(),
            "--block-size".into(),
            self.block_size.clone(),
            "--timeout-ms".into(),
            "10000".into(),
            "--json".into(),
            "--progress".into(),
            PROGRESS_EVERY.to_string(),
        ];
        let dc = self.dc;
        // Far beyond a healthy run (well under a millisecond per iteration here).
        let limit = Duration::from_secs(30) + Duration::from_millis(u64::from(self.iterations));
        let done = Arc::new(AtomicU64::new(0));
        let client: JoinHandle<Result<ClientReport>> = {
            let node = cnode.clone();
            let cfg = self.cfg.clone();
            let done = done.clone();
            thread::spawn(move || run_client(&cfg, &node, dc, client_ep, cmd, limit, &done))
        };
        if step == 0 {
            if !client.is_finished() {
                thread::sleep(Duration::from_millis(5));
            }
        } else {
            wait_until(MID_RUN_WAIT, Duration::from_millis(1), || {
                client.is_finished() || done.load(Ordering::Relaxed) >= step
            });
        }
        let served_before = done.load(Ordering::Relaxed);
        let mid_run = !client.is_finished();
        let target = format!("{}/{}", self.dc_name, self.server_ep);
        let migrated = run_migration(
            self.cfg,
            &MigrateOptions {
                target: &target,
                to: &tnode.name,
                backend: self.backend.clone(),
                fail_at: fail_at.map(str::to_string),
                quiesce_ms: None,
                json: true,
            },
            &mut io::sink(),
        );
        let joined = client
            .join()
            .map_err(|_| anyhow!("client thread panicked"))?;
        let mut v = Vec::new();
        let summary = match migrated {
            Ok(s) => {
                if s.committed && fail_at.is_some() {
                    v.push(format!(
                        "committed although --fail-at {}",
                        fail_at.unwrap_or_default()
                    ));
                } else if !s.committed && fail_at.is_none() {
                    v.push(format!(
                        "rolled back: {}",
                        s.error.clone().unwrap_or_default()
                    ));
                }
                Some(s)
            }
            Err(e) => {
                v.push(format!("migration failed: {e:#}"));
                None
            }
        };
        let client = match joined {
            Ok(r) => {
                let n = u64::from(self.iterations);
                if r.ok != n || r.lost + r.duplicated + r.corrupt > 0 {
                    v.push(format!(
                        "client: {} ok of {n}, {} lost, {} duplicated, {} corrupt{}",
                        r.ok,
                        r.lost,
                        r.duplicated,
                        r.corrupt,
                        r.complaints
                            .first()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default()
                    ));
                } else if r.code != Some(0) {
                    v.push(format!("client exited with {:?}", r.code));
                }
                if let (Some(want), Some(got)) = (self.expected_first, r.first_counter) {
                    if want != got {
                        v.push(format!(
                            "server counter: the client saw {got} first, {want} expected (state lost or replayed)"
                        ));
                    }
                }
                self.expected_first = r.last_counter.map(|c| c + 1);
                Some(r)
            }
            Err(e) => {
                v.push(format!("client: {e:#}"));
                self.expected_first = None;
                None
            }
        };
        let committed = summary.as_ref().is_some_and(|s| s.committed);
        let want = if committed { to } else { from };
        let now = self.server_node();
        if now != Some(want) {
            let name =
                |n: Option<u16>| n.map_or("no node".to_string(), |id| node_name(self.cfg, id));
            v.push(format!(
                "server runs on {}, expected on {}",
                name(now),
                name(Some(want))
            ));
        }
        Ok(Sample {
            from: self.node(from)?.name.clone(),
            to: tnode.name.clone(),
            client_node: cnode.name.clone(),
            fail_at: fail_at.map(str::to_string),
            summary,
            client,
            served_before,
            mid_run,
            violations: v,
        })
    }
}

// ----- statistics ----------------------------------------------------------------------------

/// Summary statistics of a set of samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Median (nearest rank).
    pub median: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Statistics of `v` (all zero when empty).
    pub fn of(v: &[f64]) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let mean = s.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Stats {
            n,
            mean,
            sd: var.sqrt(),
            median: nearest_rank(&s, 0.5),
            p95: nearest_rank(&s, 0.95),
            min: s[0],
            max: s[n - 1],
        }
    }
}

/// Statistics of the longest stall the client saw in each sample, in milliseconds, over the
/// samples whose client was still running when the migration started: a client that had
/// already ended saw no stall from it.
pub fn stall_stats(samples: &[Sample]) -> Stats {
    Stats::of(
        &samples
            .iter()
            .filter(|s| s.mid_run)
            .filter_map(|s| s.client.as_ref().map(|c| c.max_stall_ms))
            .collect::<Vec<_>>(),
    )
}

/// Median time of each phase over `samples`, in the order the phases first appear.
pub fn phase_medians(samples: &[&MigrationReport]) -> Vec<(String, f64)> {
    let mut order = Vec::new();
    let mut by: BTreeMap<Phase, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for p in &s.phases {
            if !by.contains_key(&p.phase) {
                order.push(p.phase);
            }
            by.entry(p.phase).or_default().push(p.ms);
        }
    }
    order
        .into_iter()
        .map(|p| {
            let m = Stats::of(&by[&p]).median;
            (p.to_string(), m)
        })
        .collect()
}

/// Where the example programs live: next to the dvs binary (cargo puts them there).
pub fn example_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("dvs has no folder")?.join(name);
    if !p.exists() {
        bail!(
            "{} not found next to dvs: build it with `cargo build --release -p dvs-examples`",
            p.display()
        );
    }
    Ok(p)
}

/// Bytes as text: B, kB or MB.
pub fn bytes_text(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=999_999 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.2} MB", b as f64 / 1e6),
    }
}
