//! What the C and Python tests share: libm3ipc as cargo built it, the C programs of
//! `examples/c` compiled against it with the system's C compiler, the Python interpreter and
//! package, and a checked run of a migr client of any language against a server of any
//! language, optionally across a criu migration of the server.

#![allow(dead_code)] // clib.rs and python.rs use different parts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;

use crate::common::examples::example_bin;
use crate::common::migr::{
    assert_client_ok, assert_runs_on, ep_log, migrate, node_name, printed, wait_served, Backend,
    ClientRun, CLIENT, SERVER,
};
use crate::common::{Cluster, DVS};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The folder with libm3ipc_c.{a,so}: dvs-cli's dev-dependency on m3ipc-c makes cargo build
/// them (in `deps`) with the binary under test.
pub fn lib_dir() -> PathBuf {
    let profile = Path::new(DVS)
        .parent()
        .expect("the dvs binary is in a folder");
    for dir in [profile.join("deps"), profile.to_path_buf()] {
        if dir.join("libm3ipc_c.a").exists() && dir.join("libm3ipc_c.so").exists() {
            return dir;
        }
    }
    panic!(
        "libm3ipc_c.a/.so not found under {}: run `cargo build -p m3ipc-c`",
        profile.display()
    )
}

/// A folder for this test process's compiled programs, kept until it exits.
fn out_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("dvs-clib-")
            .tempdir_in("/tmp")
            .expect("temp dir")
    })
    .path()
}

/// `examples/c/NAME.c` compiled with the system's C compiler (`$CC`, else `cc`) and linked
/// statically with libm3ipc (so that it runs from anywhere, also restored by criu).
pub fn c_program(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let exe = out_dir().join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|n| n == name) {
        return exe;
    }
    let repo = repo();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo.join("crates/m3ipc-c/include"))
        .arg(repo.join(format!("examples/c/{name}.c")))
        .arg(lib_dir().join("libm3ipc_c.a"))
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-o"])
        .arg(&exe)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc} (install gcc): {e}"));
    assert!(
        out.status.success(),
        "{cc} {name}.c failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    built.push(name.to_string());
    exe
}

/// The Python interpreter (`$PYTHON`, else `python3`), resolved to its real path so that
/// version-manager shims are not in the way.
pub fn python() -> String {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&py)
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {py} (install python3): {e}"));
        assert!(out.status.success(), "{py} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .clone()
}

/// The command prefix that runs a Python script with the package from this repository and
/// the library cargo built (`env` passes them through `dvs run`, whose node has its own
/// environment).
pub fn python_cmd(script: &str) -> Vec<String> {
    vec![
        "env".into(),
        format!("PYTHONPATH={}", repo().join("python").display()),
        format!("M3IPC_LIB={}", lib_dir().join("libm3ipc_c.so").display()),
        python(),
        repo().join(script).display().to_string(),
    ]
}

/// A language of a migr example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// `migr-server` / `migr-client` of dvs-examples.
    Rust,
    /// `examples/c/migr_{server,client}.c`.
    C,
    /// `python/examples/migr_{server,client}.py`.
    Python,
}

/// The command of the `role` ("server" or "client") program in `lang`.
pub fn migr_cmd(lang: Lang, role: &str) -> Vec<String> {
    match lang {
        Lang::Rust => vec![example_bin(&format!("migr-{role}")).display().to_string()],
        Lang::C => vec![c_program(&format!("migr_{role}")).display().to_string()],
        Lang::Python => python_cmd(&format!("python/examples/migr_{role}.py")),
    }
}

/// Launches `cmd` as endpoint `ep` of dc0 on node `node` with `dvs run` (in the background).
pub fn launch(c: &Cluster, node: u16, ep: i32, cmd: &[String]) {
    let mut args = vec![
        "run".to_string(),
        "--dc".into(),
        "dc0".into(),
        "--ep".into(),
        ep.to_string(),
        "--node".into(),
        node_name(c, node),
        "--".into(),
    ];
    args.extend_from_slice(cmd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.dvs(&args);
    assert!(out.status.success(), "dvs run {cmd:?}: {}", printed(&out));
}

/// A client in `lang` run with `dvs run --wait` as [`CLIENT`] on node `node`, in a thread.
pub fn start_client(c: &Cluster, lang: Lang, node: u16, iterations: u64, block: &str) -> ClientRun {
    let what = format!("{lang:?} client on node {node}");
    let mut cmd = Command::new(DVS);
    cmd.arg("--dir")
        .arg(c.dir())
        .args(["run", "--dc", "dc0", "--ep", &CLIENT.to_string()])
        .args(["--node", &node_name(c, node), "--wait", "--"])
        .args(migr_cmd(lang, "client"))
        .args(["--server", &SERVER.to_string(), "--iterations"])
        .arg(iterations.to_string())
        .args(["--block-size", block, "--json"])
        .stdin(Stdio::null());
    let (tx, rx) = mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    thread::spawn(move || {
        let out = cmd.output().expect("cannot run dvs run --wait");
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = tx.send(out);
    });
    ClientRun { what, rx, done }
}

/// A `client`-language client calls a `server`-language server across nodes (server on
/// node 0, client on node 2) and checks every block and counter. With `criu`, the server
/// moves to node 1 with criu after it served 100 requests.
pub fn mixed_run(server: Lang, client: Lang, criu: bool) {
    let name = format!("{client:?} client, {server:?} server, criu {criu}");
    let c = Cluster::start();
    launch(&c, 0, SERVER, &migr_cmd(server, "server"));
    let (iterations, block) = if criu {
        (1000, "65536")
    } else {
        (300, "65536")
    };
    let run = start_client(&c, client, 2, iterations, block);
    if criu {
        let log = ep_log(&c, 0, SERVER);
        assert!(
            wait_served(&c, &log, 1, &run),
            "{name}: the client ended before the server served 100 requests"
        );
        migrate(&c, SERVER, 1, Backend::Criu, None);
    }
    let result = run.finish(&c);
    assert_client_ok(&c, &name, &result, iterations);
    assert_runs_on(&c, SERVER, if criu { 1 } else { 0 });
}
