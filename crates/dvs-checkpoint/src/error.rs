//! Errors of checkpoint backends.

use std::io;
use std::path::PathBuf;

/// Why a checkpoint operation failed. Every variant names what failed; the CRIU ones carry
/// the tail of criu's log so that a caller (or `dvs doctor`) can show the reason without
/// opening the log.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No usable criu binary (none found, or all found were too old).
    #[error("criu not found: {0}")]
    CriuNotFound(String),

    /// A criu binary was found but is older than the minimum that works on this kernel.
    #[error("criu at {bin} is version {version}; version >= {min} is needed (run scripts/install-criu.sh)")]
    CriuTooOld {
        /// The binary that was asked.
        bin: PathBuf,
        /// What it reported.
        version: String,
        /// The minimum accepted version.
        min: String,
    },

    /// `criu check` did not say "Looks good.": the kernel or the environment lacks something.
    #[error("`{bin} check` failed ({status}): {output}")]
    CheckFailed {
        /// The binary that was run.
        bin: PathBuf,
        /// Exit status as text.
        status: String,
        /// criu's combined output (its explanation of what is missing).
        output: String,
    },

    /// The process to dump does not exist (checked before running criu).
    #[error("cannot checkpoint pid {pid}: no such process")]
    NoSuchProcess {
        /// The requested pid.
        pid: i32,
    },

    /// `criu dump` failed.
    #[error("criu dump of pid {pid} into {images_dir} failed ({status}): {reason}\n--- last lines of {log_file} ---\n{log_tail}")]
    DumpFailed {
        /// Root of the tree that was to be dumped.
        pid: i32,
        /// Image directory.
        images_dir: PathBuf,
        /// Exit status as text.
        status: String,
        /// criu's `Error` lines (the reason), or its stderr if the log had none.
        reason: String,
        /// criu's log file.
        log_file: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// `criu restore` failed.
    #[error("criu restore from {images_dir} failed ({status}): {reason}\n--- last lines of {log_file} ---\n{log_tail}")]
    RestoreFailed {
        /// Image directory.
        images_dir: PathBuf,
        /// Exit status as text.
        status: String,
        /// criu's `Error` lines (the reason), or its stderr if the log had none.
        reason: String,
        /// criu's log file.
        log_file: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// Running an external program failed before it could report anything.
    #[error("cannot run {what} ({bin}): {source}")]
    Spawn {
        /// What we tried to do ("criu dump", ...).
        what: &'static str,
        /// The program.
        bin: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A request was malformed (e.g. an inherit-fd key criu would reject).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// Sending a signal to a process failed.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        /// Target pid.
        pid: i32,
        /// Signal name.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Any other I/O failure, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path involved.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// An operation waited too long.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl CheckpointError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        CheckpointError::Io {
            what: what.into(),
            source,
        }
    }
}
