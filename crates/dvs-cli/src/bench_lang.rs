//! `dvs bench ipc --lang c|python`: the sendrec latency of libm3ipc (C) and of the Python
//! package beside the Rust library's, in the same run and on the same cluster, in
//! alternating blocks so that a noisy machine hurts every language alike.
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
use crate::bench_serve::{sendrec_samples, Server};
use crate::helpers::progress;

const C_CLIENT: &str = include_str!("../../../examples/c/bench_client.c");
const C_HEADER: &str = include_str!("../../m3ipc-c/include/m3ipc.h");
const PY_CLIENT: &str = include_str!("../../../python/examples/bench_client.py");
const PY_PACKAGE: &str = include_str!("../../../python/m3ipc/__init__.py");

/// Alternating blocks per figure.
const BLOCKS: usize = 6;
const EP_LOCAL_SERVER: Ep = 1;
const EP_REMOTE_SERVER: Ep = 2;
const EP_RUST: Ep = 10;
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

/// One language's round trips to one server.
#[derive(Debug, Serialize)]
struct Figure {
    lang: &'static str,
    server: &'static str,
    latency: Latency,
}

#[derive(Debug, Serialize)]
struct Report {
    iterations: usize,
    blocks: usize,
    loadavg_before: String,
    loadavg_after: String,
    raw_unix_rtt: Latency,
    figures: Vec<Figure>,
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

/// `dvs bench ipc --lang LANG`.
pub fn ipc_lang(lang: Lang, iterations: u32, clib: Option<&Path>, json: bool) -> Result<ExitCode> {
    let n = iterations as usize;
    let per_block = n.div_ceil(BLOCKS);
    let warmup = (per_block / 10).clamp(50, 1000);
    let lib = find_lib(clib)?;
    let tmp = TempDir(std::env::temp_dir().join(format!("dvs-bench-lang-{}", std::process::id())));
    std::fs::create_dir_all(tmp.path())?;
    let c_exe = build_clients(tmp.path(), &lib)?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let loadavg_before = loadavg();
    progress("raw Unix-socket ping-pong");
    let (a, b) = UnixStream::pair()?;
    let raw_unix_rtt = raw_pingpong(a, b, warmup * BLOCKS, n)?;

    let mut figures = Vec::new();
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
            let (mut r, mut c, mut p) = (Vec::new(), Vec::new(), Vec::new());
            for block in 0..BLOCKS {
                progress(&format!(
                    "{where_} sendrec, block {} of {BLOCKS}",
                    block + 1
                ));
                r.extend(sendrec_samples(&mut rust, server, warmup, per_block)?);
                let args = |ep: Ep| {
                    [&sock, &dc.to_string(), &ep.to_string(), &server.to_string()]
                        .map(|s| s.to_string())
                        .into_iter()
                        .chain([warmup.to_string(), per_block.to_string()])
                        .collect::<Vec<_>>()
                };
                c.extend(run_block(Command::new(&c_exe), &args(EP_C))?);
                if lang == Lang::Python {
                    let mut cmd = Command::new(&python);
                    cmd.arg(tmp.path().join("bench_client.py"))
                        .env("PYTHONPATH", tmp.path())
                        .env("M3IPC_LIB", &lib);
                    p.extend(run_block(cmd, &args(EP_PY))?);
                }
            }
            for (name, samples) in [("rust", r), ("c", c), ("python", p)] {
                if !samples.is_empty() {
                    figures.push(Figure {
                        lang: name,
                        server: where_,
                        latency: Latency::from_samples(samples),
                    });
                }
            }
        }
        local.stop(&mut rust)?;
        remote.stop(&mut rust)?;
        Ok(())
    })?;
    let report = Report {
        iterations: per_block * BLOCKS,
        blocks: BLOCKS,
        loadavg_before,
        loadavg_after: loadavg(),
        raw_unix_rtt,
        figures,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("dvs bench ipc --lang {lang:?}: sendrec round trips, {} per language and server in {BLOCKS} alternating blocks", report.iterations);
    println!(
        "  library {}; load {} before / {} after",
        lib.display(),
        report.loadavg_before,
        report.loadavg_after
    );
    println!("  {:<28} {:>9} {:>9} {:>9}", "", "median", "p99", "mean");
    let row = |name: &str, l: &Latency| {
        println!(
            "  {name:<28} {:>6.1} µs {:>6.1} µs {:>6.1} µs",
            l.median_us, l.p99_us, l.mean_us
        )
    };
    row("raw Unix ping-pong", &report.raw_unix_rtt);
    for f in &report.figures {
        row(&format!("{} sendrec, {}", f.lang, f.server), &f.latency);
    }
    for where_ in ["local", "remote"] {
        let get = |lang: &str| {
            report
                .figures
                .iter()
                .find(|f| f.lang == lang && f.server == where_)
                .map(|f| f.latency.median_us)
        };
        if let (Some(r), Some(c)) = (get("rust"), get("c")) {
            let ratio = c / r;
            println!(
                "  C / Rust median, {where_}: {ratio:.3} (target <= 1.05: {})",
                if ratio <= 1.05 { "met" } else { "MISSED" }
            );
        }
        if let (Some(r), Some(p)) = (get("rust"), get("python")) {
            println!("  Python / Rust median, {where_}: {:.2}", p / r);
        }
    }
    Ok(ExitCode::SUCCESS)
}
