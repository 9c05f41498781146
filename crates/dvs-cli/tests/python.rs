//! The Python package `m3ipc` (ctypes over libm3ipc) against real clusters: its message
//! layout and codes against the Rust side, every call from Python threads on one node and
//! across nodes (vcopy to and from bytearrays of 1 B, 64 KiB and 1 MiB, exceptions per
//! code), and Python programs talking to C ones, also across a criu migration of the server;
//! and `pip install ./python` into a fresh venv, offline, whose package then works.

mod clib_support;
mod common;

use std::process::{Command, Stdio};

use clib_support::{lib_dir, mixed_run, python, python_cmd, repo, Lang};
use common::examples::criu_available;
use common::migr::serial;
use common::Cluster;
use m3ipc_c::codes::CODES;
use m3ipc_c::message::{FIELDS, MESSAGE_SIZE};
use serde_json::Value;

/// Runs `python3 python/tests/check_calls.py ARGS` and returns its output, failing the test
/// if it failed or reported a failed check.
fn check_calls(args: &[&str]) -> String {
    let cmd = python_cmd("python/tests/check_calls.py");
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("FAIL"),
        "check_calls.py {args:?} ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_python_message_and_codes_match_the_rust_side() {
    let v: Value = serde_json::from_str(&check_calls(&["layout"])).expect("JSON");
    assert_eq!(v["size"], MESSAGE_SIZE);
    let fields = v["fields"].as_object().expect("fields");
    assert_eq!(fields.len(), FIELDS.len());
    for f in FIELDS {
        assert_eq!(
            fields[f.name],
            serde_json::json!([f.offset, f.size]),
            "Python and Rust disagree on {}",
            f.name
        );
    }
    let codes = v["codes"].as_object().expect("codes");
    assert_eq!(codes.len(), CODES.len());
    for c in CODES {
        assert_eq!(codes[c.name], c.value, "{}", c.name);
    }
    assert_eq!(v["consts"]["ANY"], m3ipc_c::ANY);
    assert_eq!(v["consts"]["SELF"], m3ipc_c::SELF);
    assert_eq!(v["consts"]["NOTIFY_MTYPE"], m3ipc::NOTIFY_MTYPE);
}

/// Runs `cmd` to its end and returns its stdout,
/// failing the test with everything it printed if it failed.
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect(what);
    assert!(
        out.status.success(),
        "{what} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pip_installs_the_package_into_a_fresh_venv_offline() {
    let tmp = tempfile::Builder::new()
        .prefix("dvs-pip-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let venv = tmp.path().join("venv");
    // A venv without the system's site packages: only what pip and the package bring.
    run_ok(
        "python3 -m venv (Debian: apt-get install python3-venv)",
        Command::new(python()).arg("-m").arg("venv").arg(&venv),
    );
    let py = venv.join("bin/python");
    // --no-index: nothing may be downloaded, not even build dependencies.
    run_ok(
        "pip install ./python",
        Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--no-index"])
            .arg(repo().join("python"))
            .env_remove("PYTHONPATH")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    );
    // Imported from the venv (not from the source tree: the working folder is elsewhere and
    // PYTHONPATH is unset), it loads libm3ipc and agrees with the Rust side.
    let lib = lib_dir().join("libm3ipc_c.so");
    let site = run_ok(
        "import m3ipc",
        Command::new(&py)
            .args([
                "-c",
                "import m3ipc; print(m3ipc.__file__); print(m3ipc.strerror(m3ipc.CODES['EDVSTIMEDOUT']))",
            ])
            .current_dir(tmp.path())
            .env_remove("PYTHONPATH")
            .env("M3IPC_LIB", &lib),
    );
    let mut lines = site.lines();
    let file = lines.next().unwrap_or_default();
    assert!(
        file.starts_with(&venv.display().to_string()),
        "m3ipc imported from {file:?}, not from the venv"
    );
    assert_eq!(
        lines.next(),
        Some("timed out"),
        "dvk_strerror through the installed package"
    );
    let layout = run_ok(
        "check_calls.py layout with the installed package",
        Command::new(&py)
            .arg(repo().join("python/tests/check_calls.py"))
            .arg("layout")
            .current_dir(tmp.path())
            .env_remove("PYTHONPATH")
            .env("M3IPC_LIB", &lib),
    );
    let v: Value = serde_json::from_str(&layout).expect("JSON");
    assert_eq!(v["size"], MESSAGE_SIZE);
    assert_eq!(v["codes"].as_object().map(|c| c.len()), Some(CODES.len()));
    let listed = run_ok(
        "pip show -f m3ipc",
        Command::new(&py).args(["-m", "pip", "show", "-f", "m3ipc"]),
    );
    assert!(
        listed.contains("Version: 0.1.0") && listed.contains("m3ipc/__init__.py"),
        "{listed}"
    );
}

#[test]
fn every_call_from_python_on_one_node_and_across_nodes() {
    let c = Cluster::start();
    let s = |n: u16| c.node(n).ipc_socket().display().to_string();
    for (client, server, base) in [(0, 0, "10"), (0, 1, "20")] {
        let text = check_calls(&["calls", &s(client), &s(server), "0", base]);
        for n in [1, 65536, 1048576] {
            for what in ["vcopy_to", "vcopy_from"] {
                let dir = if what == "vcopy_to" { "into" } else { "out of" };
                let line = format!("ok {what} {n} bytes {dir} a bytearray");
                assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
            }
        }
        assert!(
            text.contains("ok EDVSTIMEDOUT") && text.contains("ok sendrec"),
            "{text}"
        );
    }
}

#[test]
fn python_client_c_server() {
    mixed_run(Lang::C, Lang::Python, false);
}

#[test]
fn c_client_python_server() {
    mixed_run(Lang::Python, Lang::C, false);
}

#[test]
fn c_client_python_server_migrated_with_criu() {
    let _turn = serial();
    if criu_available("c_client_python_server_migrated_with_criu") {
        mixed_run(Lang::Python, Lang::C, true);
    }
}

#[test]
fn python_client_c_server_migrated_with_criu() {
    let _turn = serial();
    if criu_available("python_client_c_server_migrated_with_criu") {
        mixed_run(Lang::C, Lang::Python, true);
    }
}
