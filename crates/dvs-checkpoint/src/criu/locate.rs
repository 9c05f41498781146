//! Finding a usable criu binary and asking its version.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{DEFAULT_CRIU_PREFIX, MIN_CRIU_VERSION};
use crate::CheckpointError;

/// Finds a usable criu (version >= [`MIN_CRIU_VERSION`]), in order: `$DVS_CRIU`,
/// `$DVS_CRIU_PREFIX/bin/criu` (default [`DEFAULT_CRIU_PREFIX`]), then `criu` on `PATH`.
/// Use [`Criu::locate`] to learn why none was found.
pub fn find_criu() -> Option<PathBuf> {
    candidates()
        .into_iter()
        .find_map(|(_, bin)| probe(&bin).ok().map(|_| bin))
}

/// The candidate binaries with a label saying where each came from.
pub(super) fn candidates() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Some(p) = env::var_os("DVS_CRIU").filter(|p| !p.is_empty()) {
        out.push(("$DVS_CRIU".to_string(), PathBuf::from(p)));
    }
    let prefix = env::var_os("DVS_CRIU_PREFIX")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CRIU_PREFIX));
    out.push(("private prefix".to_string(), prefix.join("bin/criu")));
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let bin = dir.join("criu");
            if bin.is_file() {
                out.push(("PATH".to_string(), bin));
                break;
            }
        }
    }
    out
}

/// Runs `bin --version` and checks the minimum. Returns the version, or why it is unusable.
pub(super) fn probe(bin: &Path) -> Result<String, CheckpointError> {
    if !bin.is_file() {
        return Err(CheckpointError::CriuNotFound(format!(
            "{} does not exist",
            bin.display()
        )));
    }
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CheckpointError::Spawn {
            what: "criu --version",
            bin: bin.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
    else {
        return Err(CheckpointError::CriuNotFound(format!(
            "{} --version printed no version ({}): {}{}",
            bin.display(),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    };
    match parse_version(&version) {
        Some(v) if v >= MIN_CRIU_VERSION => Ok(version),
        _ => Err(CheckpointError::CriuTooOld {
            bin: bin.to_path_buf(),
            version,
            min: format!("{}.{}", MIN_CRIU_VERSION.0, MIN_CRIU_VERSION.1),
        }),
    }
}

/// `"4.1.1"` → `(4, 1)`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split(['.', '-', ' ']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Criu;

    #[test]
    fn versions() {
        assert_eq!(parse_version("4.1.1"), Some((4, 1)));
        assert_eq!(parse_version("3.17.1"), Some((3, 17)));
        assert_eq!(parse_version("4"), Some((4, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(parse_version("4.2.1").unwrap() >= MIN_CRIU_VERSION);
        assert!(parse_version("4.1.1").unwrap() < MIN_CRIU_VERSION);
        assert!(parse_version("3.17.1").unwrap() < MIN_CRIU_VERSION);
        assert!(parse_version("4.0").unwrap() < MIN_CRIU_VERSION);
    }

    #[test]
    fn missing_binary_is_not_found() {
        assert!(matches!(
            Criu::at("/nonexistent/criu"),
            Err(CheckpointError::CriuNotFound(_))
        ));
    }
}
