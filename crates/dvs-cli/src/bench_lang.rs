//! `dvs bench ipc --lang c|python`: the sendrec latency of libm3ipc (C) and of the Python
//! package beside the Rust library's, in the same run and on the same cluster.
//!
//! A busy machine moves whole blocks of round trips up and down, so the run is cut into
//! short blocks ([`BLOCK`] round trips per language; `--iterations` / [`BLOCK`] blocks per
//! server). Each block measures every language once, in an order
//! that rotates from block to block (so that no language always runs first or last), plus a
//! raw Unix-socket ping-pong, the machine's own noise gauge. The comparison is the ratio of
//! the languages' medians *within* each block, summed up over the blocks by its median and
//! spread (quartiles, extremes, a 95% confidence interval of the median): the blocks a burst
//! of load hit show up as outliers instead of shifting the figure, and the target (C within
//! 5% of Rust) is called met or missed only when the interval is on one side of it. How quiet the machine was is printed beside it: the load average
//! before and after, and the raw ping-pong's median per block (median and extremes).
//!
//! The C client (`examples/c/bench_client.c`) and the Python client
//! (`python/examples/bench_client.py`, with the package) are built into the binary; the bench
//! writes them to its temporary folder, compiles the C one with the system's C compiler
//! against the shared libm3ipc (found next to the `dvs` binary, as cargo builds it, in the
//! system's library folders, or given with `--clib`), and runs each block as a process that
//! times its own round trips (process start-up is not measured). The Rust client is a
//! thread of the bench. All talk to the same echo server thread.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use m3ipc::{Endpoint, Ep, Timeout};
use serde::Serialize;

use crate::bench::{loadavg, raw_pingpong, with_clusters, Latency};
use crate::bench_serve::Server;
use crate::helpers::progress;

const C_CLIENT: &str = include_str!("../../../examples/c/bench_client.c");
const C_HEADER: &str = include_str!("../../m3ipc-c/include/m3ipc.h");
const PY_CLIENT: &str = include_str!("../../../python/examples/bench_client.py");
const PY_PACKAGE: &str = include_str!("../../../python/m3ipc/__init__.py");

/// Round trips per language in one block: short, so that the languages of one block see
/// the same machine. `--iterations` sets how many blocks there are (at least [`MIN_BLOCKS`]).
const BLOCK: usize = 500;
/// The fewest blocks per server.
const MIN_BLOCKS: usize = 10;
/// The C library's target: its median sendrec within 5% of the Rust library's.
const TARGET: f64 = 1.05;
const EP_LOCAL_SERVER: Ep = 1;
const EP_REMOTE_SERVER: Ep = 2;
const EP_RUST: Ep = 10;
/// The Rust client process (`ipc-bench-client`).
const EP_RUST_CLIENT: Ep = 11;
const EP_C: Ep = 12;
const EP_PY: Ep = 13;

/// The language compared with the Rust library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// The Rust library only (the usual `bench ipc`).
    Rust,
    /// libm3ipc from C, beside Rust.
    C,
    /// The Python package, beside C and Rust.
    Python,
}

/// One language's round trips to one server, all blocks pooled.
#[derive(Debug, Serialize)]
struct Figure {
    lang: &'static str,
    server: &'static str,
    latency: Latency,
    /// The median of each block, in µs.
    block_medians_us: Vec<f64>,
}

/// How a set of per-block values is spread.
#[derive(Debug, Clone, Serialize)]
struct Spread {
    median: f64,
    /// First and third quartiles.
    p25: f64,
    p75: f64,
    min: f64,
    max: f64,
    /// A 95% confidence interval of the median: the order statistics n/2 ± 1.96·√n/2 (no
    /// assumption on the distribution; the blocks are taken as independent).
    median_ci95: (f64, f64),
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        // Linear interpolation between the closest ranks.
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let x = q * (v.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
        };
        let n = v.len() as f64;
        let k = 1.96 * n.sqrt() / 2.0;
        let rank = |r: f64| v.get((r.max(0.0) as usize).min(v.len().saturating_sub(1)));
        let ci = match (
            rank((n / 2.0 - k).floor()),
            rank((n / 2.0 + k).ceil() - 1.0),
        ) {
            (Some(lo), Some(hi)) => (*lo, *hi),
            _ => (0.0, 0.0),
        };
        Spread {
            median_ci95: ci,
            median: at(0.5),
            p25: at(0.25),
            p75: at(0.75),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// A language against Rust on one server: the ratio of their medians in each block.
#[derive(Debug, Serialize)]
struct Ratio {
    lang: &'static str,
    server: &'static str,
    per_block: Vec<f64>,
    spread: Spread,
    /// Blocks whose ratio is at most [`TARGET`].
    blocks_within_target: usize,
}

/// How quiet the machine was during the run.
#[derive(Debug, Serialize)]
struct Quiet {
    loadavg_before: String,
    loadavg_after: String,
    /// The raw Unix ping-pong's median in each block (local blocks, then remote ones), in µs.
    raw_unix_block_medians_us: Vec<f64>,
    raw_unix_spread_us: Spread,
}

#[derive(Debug, Serialize)]
struct Report {
    iterations: usize,
    blocks: usize,
    quiet: Quiet,
    figures: Vec<Figure>,
    ratios: Vec<Ratio>,
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared libm3ipc to link and load: `clib`, else next to the running binary (cargo's
/// target folder), else the system's library folders.
fn find_lib(clib: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = clib {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary folder")?;
    let candidates = [
        dir.join("libm3ipc_c.so"),
        dir.join("deps/libm3ipc_c.so"),
        PathBuf::from("/usr/local/lib/libm3ipc.so"),
        PathBuf::from("/usr/lib/libm3ipc.so"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("libm3ipc not found: build it (cargo build -p m3ipc-c), install it (scripts/install-clib.sh) or pass --clib PATH")
}

/// Writes the clients into `dir` and compiles the C one; returns (C program, Python dir).
fn build_clients(dir: &Path, lib: &Path) -> Result<PathBuf> {
    std::fs::write(dir.join("bench_client.c"), C_CLIENT)?;
    std::fs::write(dir.join("m3ipc.h"), C_HEADER)?;
    std::fs::create_dir_all(dir.join("m3ipc"))?;
    std::fs::write(dir.join("m3ipc/__init__.py"), PY_PACKAGE)?;
    std::fs::write(dir.join("bench_client.py"), PY_CLIENT)?;
    let exe = dir.join("bench_client");
    let lib_dir = lib.parent().context("library folder")?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-I"])
        .arg(dir)
        .arg(dir.join("bench_client.c"))
        .arg(lib)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .with_context(|| format!("cannot run the C compiler {cc}"))?;
    if !out.status.success() {
        bail!(
            "{cc} bench_client.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(exe)
}

/// One block of a client process: its round trips in nanoseconds.
fn run_block(mut cmd: Command, args: &[String]) -> Result<Vec<u64>> {
    let out = cmd.args(args).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "bench client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>().context("a round trip in ns"))
        .collect()
}

/// The median of `ns` (nanoseconds) in µs.
fn median_us(ns: &[u64]) -> f64 {
    Latency::from_samples(ns.to_vec()).median_us
}

/// `dvs bench ipc --lang LANG`.
pub fn ipc_lang(lang: Lang, iterations: u32, clib: Option<&Path>, json: bool) -> Result<ExitCode> {
    let n = iterations as usize;
    let blocks = (n / BLOCK).max(MIN_BLOCKS);
    let per_block = n.div_ceil(blocks);
    let warmup = (per_block / 10).clamp(50, 1000);
    let lib = find_lib(clib)?;
    let tmp = TempDir(std::env::temp_dir().join(format!("dvs-bench-lang-{}", std::process::id())));
    std::fs::create_dir_all(tmp.path())?;
    let c_exe = build_clients(tmp.path(), &lib)?;
    let rust_exe = crate::harness::example_binary("ipc-bench-client")?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let langs: &[&'static str] = if lang == Lang::Python {
        &["rust", "c", "python"]
    } else {
        &["rust", "c"]
    };
    let loadavg_before = loadavg();

    let mut figures = Vec::new();
    let mut ratios = Vec::new();
    let mut raw_blocks = Vec::new();
    with_clusters(&[true], |cfgs| {
        let cfg = &cfgs[0];
        let dc = cfg.dcs.first().context("no DC")?.id;
        let (node0, node1) = (cfg.nodes[0].ipc_socket(), cfg.nodes[1].ipc_socket());
        let local = Server::start(&node0, dc, EP_LOCAL_SERVER)?;
        let remote = Server::start(&node1, dc, EP_REMOTE_SERVER)?;
        let mut rust = Endpoint::bind_at(&node0, dc, EP_RUST)?;
        for ep in [EP_LOCAL_SERVER, EP_REMOTE_SERVER] {
            rust.wait_for_bind(ep, Timeout::Millis(5000))?;
        }
        let sock = node0.display().to_string();
        for (server, where_) in [(EP_LOCAL_SERVER, "local"), (EP_REMOTE_SERVER, "remote")] {
            // samples[i]: every round trip of langs[i]; medians[i]: its median per block.
            let mut samples: Vec<Vec<u64>> = vec![Vec::new(); langs.len()];
            let mut medians: Vec<Vec<f64>> = vec![Vec::new(); langs.len()];
            for block in 0..blocks {
                progress(&format!(
                    "{where_} sendrec, block {} of {blocks}",
                    block + 1
                ));
                let (a, b) = UnixStream::pair()?;
                let raw = raw_pingpong(a, b, warmup, per_block)?;
                raw_blocks.push(raw.median_us);
                let args = |ep: Ep| {
                    [&sock, &dc.to_string(), &ep.to_string(), &server.to_string()]
                        .map(|s| s.to_string())
                        .into_iter()
                        .chain([warmup.to_string(), per_block.to_string()])
                        .collect::<Vec<_>>()
                };
                // Each block starts with another language.
                for k in 0..langs.len() {
                    let i = (block + k) % langs.len();
                    let ns = match langs[i] {
                        // A process of its own, as the C and Python clients are.
                        "rust" => run_block(Command::new(&rust_exe), &args(EP_RUST_CLIENT))?,
                        "c" => run_block(Command::new(&c_exe), &args(EP_C))?,
                        _ => {
                            let mut cmd = Command::new(&python);
                            cmd.arg(tmp.path().join("bench_client.py"))
                                .env("PYTHONPATH", tmp.path())
                                .env("M3IPC_LIB", &lib);
                            run_block(cmd, &args(EP_PY))?
                        }
                    };
                    medians[i].push(median_us(&ns));
                    samples[i].extend(ns);
                }
            }
            for (i, name) in langs.iter().enumerate().skip(1) {
                let per_block: Vec<f64> = medians[i]
                    .iter()
                    .zip(&medians[0])
                    .map(|(x, r)| x / r)
                    .collect();
                ratios.push(Ratio {
                    lang: name,
                    server: where_,
                    spread: Spread::of(&per_block),
                    blocks_within_target: per_block.iter().filter(|r| **r <= TARGET).count(),
                    per_block,
                });
            }
            for (i, name) in langs.iter().enumerate() {
                figures.push(Figure {
                    lang: name,
                    server: where_,
                    latency: Latency::from_samples(std::mem::take(&mut samples[i])),
                    block_medians_us: std::mem::take(&mut medians[i]),
                });
            }
        }
        local.stop(&mut rust)?;
        remote.stop(&mut rust)?;
        Ok(())
    })?;
    let report = Report {
        iterations: per_block * blocks,
        blocks,
        quiet: Quiet {
            loadavg_before,
            loadavg_after: loadavg(),
            raw_unix_spread_us: Spread::of(&raw_blocks),
            raw_unix_block_medians_us: raw_blocks,
        },
        figures,
        ratios,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_report(lang, &lib, &report);
    Ok(ExitCode::SUCCESS)
}

fn print_report(lang: Lang, lib: &Path, report: &Report) {
    let q = &report.quiet;
    let r = &q.raw_unix_spread_us;
    println!(
        "dvs bench ipc --lang {lang:?}: sendrec round trips, {} per language and server, in {} blocks of {} (the order of the languages rotates from block to block)",
        report.iterations,
        report.blocks,
        report.iterations / report.blocks.max(1)
    );
    println!("  library {}", lib.display());
    println!(
        "  machine: load {} before / {} after; raw Unix ping-pong per block: median {:.1} µs (quartiles {:.1}-{:.1}, extremes {:.1}-{:.1})",
        q.loadavg_before, q.loadavg_after, r.median, r.p25, r.p75, r.min, r.max
    );
    println!(
        "  {:<22} {:>9} {:>9} {:>9}   per-block medians",
        "", "median", "p99", "mean"
    );
    for f in &report.figures {
        let b = Spread::of(&f.block_medians_us);
        println!(
            "  {:<22} {:>6.1} µs {:>6.1} µs {:>6.1} µs   {:.1}-{:.1} µs",
            format!("{} sendrec, {}", f.lang, f.server),
            f.latency.median_us,
            f.latency.p99_us,
            f.latency.mean_us,
            b.min,
            b.max
        );
    }
    for x in &report.ratios {
        let s = &x.spread;
        let (lo, hi) = s.median_ci95;
        let verdict = if x.lang != "c" {
            String::new()
        } else if hi <= TARGET {
            format!(" (target <= {TARGET}: met)")
        } else if lo > TARGET {
            format!(" (target <= {TARGET}: MISSED)")
        } else {
            format!(" (target <= {TARGET}: not resolved by this run)")
        };
        println!(
            "  {} / Rust, {}: median of per-block ratios {:.3}, 95% CI {lo:.3}-{hi:.3}{verdict}; quartiles {:.3}-{:.3}, extremes {:.3}-{:.3}; {} of {} blocks <= {TARGET}",
            if x.lang == "c" { "C" } else { "Python" },
            x.server,
            s.median,
            s.p25,
            s.p75,
            s.min,
            s.max,
            x.blocks_within_target,
            x.per_block.len()
        );
    }
}
