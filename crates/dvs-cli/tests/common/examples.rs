//! The example programs (`migr-server`, `migr-client`) the migration tests launch, and
//! whether criu works here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::DVS;

/// The path of example program `name` (`migr-server`, `migr-client`), from the target folder
/// the `dvs` binary under test was built in. `cargo test --workspace` builds them; with
/// `cargo test -p dvs-cli` they may be missing, and are then built once with
/// `cargo build -p dvs-examples --bins` in the same profile and target folder.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILD: OnceLock<Result<(), String>> = OnceLock::new();
    let profile_dir = Path::new(DVS)
        .parent()
        .expect("the dvs binary is in a folder");
    let path = profile_dir.join(name);
    if !path.exists() {
        let built = BUILD.get_or_init(|| build_examples(profile_dir));
        if let Err(e) = built {
            panic!(
                "{} does not exist and building it failed ({e}): run `cargo build -p dvs-examples` \
                 (or `cargo test --workspace`, which builds it)",
                path.display()
            );
        }
    }
    assert!(
        path.exists(),
        "{} does not exist, even after `cargo build -p dvs-examples --bins`: the migration tests \
         need the dvs-examples binaries next to the dvs binary",
        path.display()
    );
    path
}

/// Runs `cargo build -p dvs-examples --bins` into the target folder and profile of
/// `profile_dir` (e.g. `target/debug`, or `target/TRIPLE/release`).
fn build_examples(profile_dir: &Path) -> Result<(), String> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "-p", "dvs-examples", "--bins"]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => return Err(format!("odd binary folder {}", profile_dir.display())),
    }
    let parent = profile_dir.parent().ok_or("no target folder")?;
    // target/PROFILE, or target/TRIPLE/PROFILE when cross-compiling.
    let target_dir = if parent.join("CACHEDIR.TAG").exists() {
        parent
    } else {
        let triple = parent
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("no triple")?;
        cmd.args(["--target", triple]);
        parent.parent().ok_or("no target folder")?
    };
    cmd.env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null());
    eprintln!("migration tests: building the example programs: {cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("cannot run cargo: {e}"))?;
    // Generous: other builds may hold the target folder's lock for a while.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("cargo build exited with {status}"))
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cargo build did not finish within 15 minutes".into());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the criu tests should run: `true` when `dvs doctor` says the criu backend works.
/// Otherwise the test fails, telling to run `scripts/install-criu.sh`, unless
/// `DVS_SKIP_CRIU=1` is set: then this prints why and returns `false` (skip the test).
pub fn criu_available(test: &str) -> bool {
    static DOCTOR: OnceLock<Result<(), String>> = OnceLock::new();
    let usable = DOCTOR.get_or_init(|| {
        // A folder without a cluster: only this machine is checked.
        let out = super::dvs(&["--dir", "/nonexistent/dvs-migration-tests", "doctor"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("criu backend"))
            .map(str::to_string);
        match line {
            Some(l) if l["criu backend".len()..].trim_start().starts_with("yes") => Ok(()),
            Some(l) => Err(l.split_whitespace().collect::<Vec<_>>().join(" ")),
            None => Err(format!(
                "`dvs doctor` printed no criu line: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    });
    match usable {
        Ok(()) => true,
        Err(why) if std::env::var("DVS_SKIP_CRIU").is_ok_and(|v| v == "1") => {
            println!("skipping {test}: criu is not usable here (DVS_SKIP_CRIU=1): {why}");
            false
        }
        Err(why) => panic!(
            "criu is not usable here ({why}): run scripts/install-criu.sh (as root), or set \
             DVS_SKIP_CRIU=1 to skip the criu migration tests"
        ),
    }
}
