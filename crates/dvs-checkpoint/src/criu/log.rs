//! What a failed criu run says: the reason from its log's `Error` lines, and the log's tail.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Output;

use super::{rpc, LOG_TAIL_LINES};

/// (status, reason, log tail) of a request criu refused.
pub(super) fn rpc_failure(log_file: &Path, resp: &rpc::Resp) -> (String, String, String) {
    let status = match resp.cr_errno {
        Some(n) if n != 0 => format!("criu swrk failed, {}", io::Error::from_raw_os_error(n)),
        _ => "criu swrk failed".to_string(),
    };
    let out = Output {
        status: std::process::ExitStatus::default(),
        stdout: resp.cr_errmsg.clone().unwrap_or_default().into_bytes(),
        stderr: Vec::new(),
    };
    let (reason, tail) = failure_reason(log_file, &out);
    (status, reason, tail)
}

pub(super) fn combined(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// Lines of criu's errors that say nothing about this failure: the summary line, and the
/// RLIMIT_NOFILE complaint criu prints on every run where CAP_SYS_RESOURCE is missing.
const NOISE: [&str; 3] = [
    "Dumping FAILED",
    "Restoring FAILED",
    "Can't setup RLIMIT_NOFILE",
];

/// (reason, log tail) for a failed criu run: criu's `Error (...)` lines without timestamps
/// and noise, else its stderr, else the exit status.
pub(super) fn failure_reason(log_file: &Path, out: &Output) -> (String, String) {
    let log = fs::read_to_string(log_file).unwrap_or_default();
    let tail = {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    };
    (
        reason_from(&log, &combined(out), &out.status.to_string()),
        tail,
    )
}

fn reason_from(log: &str, output: &str, status: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("Error (").map(|(_, rest)| rest))
        .map(|rest| rest.split_once("): ").map_or(rest, |(_, msg)| msg).trim())
        .collect();
    let meaningful: Vec<&str> = errors
        .iter()
        .copied()
        .filter(|e| !NOISE.iter().any(|n| e.contains(n)))
        .collect();
    if !meaningful.is_empty() {
        meaningful.join("; ")
    } else if !output.trim().is_empty() {
        output.trim().to_string()
    } else if !errors.is_empty() {
        errors.join("; ")
    } else {
        format!("criu {status}, no error in its log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_skips_noise_and_timestamps() {
        let log = "(00.024502) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.034440) Error (criu/pstree.c:300): The root process 8974 is not a session leader. Consider using --shell-job option\n\
                   (00.034544) Error (criu/cr-dump.c:2111): Dumping FAILED.\n";
        assert_eq!(
            reason_from(log, "", "exit status: 1"),
            "The root process 8974 is not a session leader. Consider using --shell-job option"
        );
        assert_eq!(
            reason_from("", "bad option\n", "exit status: 1"),
            "bad option"
        );
        assert_eq!(
            reason_from("", "", "exit status: 1"),
            "criu exit status: 1, no error in its log"
        );
    }
}
