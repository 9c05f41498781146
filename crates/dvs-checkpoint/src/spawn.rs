//! Starting a migratable process in one step: a `clone3` into a new PID namespace, then
//! `execve` of the program, which is that namespace's pid 1 and a session leader.
//!
//! Why not `unshare --pid --fork setsid PROGRAM` ([`crate::migratable_command`]): that runs
//! two helper programs before the real one, and each exec of a dynamically linked program
//! costs about a millisecond here (3.4 ms for `unshare --pid --fork setsid true` against
//! 0.8 ms for `true`). A cooperative migration starts its program while the endpoint's
//! callers wait, so those milliseconds are part of every such move. Without a helper the
//! process the caller gets is the namespace's init itself, and its exit is watched through a
//! pidfd.
//!
//! Between `clone3` and `execve` the child runs only raw system calls on memory prepared
//! beforehand: the caller may be multithreaded, and another thread may hold a lock of the
//! allocator.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What to start: the program, its arguments and environment, its standard streams and
/// folder.
#[derive(Debug)]
pub struct PidNsCommand {
    /// The program: a path, or a name looked up in the caller's `PATH`.
    pub program: OsString,
    /// Its arguments after the program's name.
    pub args: Vec<OsString>,
    /// Variables set on top of the caller's environment.
    pub env: Vec<(OsString, OsString)>,
    /// The folder it starts in.
    pub cwd: PathBuf,
    /// Standard output and error; standard input is `/dev/null`.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
    /// Its umask.
    pub umask: u32,
}

/// A started process: pid 1 of its own PID namespace, a child of the caller.
#[derive(Debug)]
pub struct PidNsChild {
    /// Its pid in the caller's namespace.
    pub pid: i32,
    /// A pidfd for it: readable once it has ended; [`wait_pidfd`] then reaps it.
    pub pidfd: OwnedFd,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// The kernel's `struct clone_args` (the fields up to `cgroup`, as of Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Everything the child needs, as C data, built before the clone.
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// The program's path: as given when it holds a `/`, else the first executable of that name
/// in `PATH` (what `execvp` would run).
fn resolve(program: &OsStr) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        let Ok(c) = cstring(candidate.as_os_str().as_bytes(), "the program path") else {
            continue;
        };
        // SAFETY: access(2) reads a NUL-terminated path we own.
        if candidate.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found in PATH", Path::new(program).display()),
    ))
}

fn prepare(cmd: &PidNsCommand) -> io::Result<Prepared> {
    let path = resolve(&cmd.program)?;
    let mut argv = vec![cstring(cmd.program.as_bytes(), "the program name")?];
    for a in &cmd.args {
        argv.push(cstring(a.as_bytes(), "an argument")?);
    }
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !cmd.env.iter().any(|(o, _)| o == k))
        .collect();
    vars.extend(cmd.env.iter().cloned());
    let mut envp = Vec::with_capacity(vars.len());
    for (k, v) in vars {
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend(v.into_vec());
        envp.push(cstring(&kv, "an environment variable")?);
    }
    Ok(Prepared {
        path: cstring(path.as_os_str().as_bytes(), "the program path")?,
        argv,
        envp,
        cwd: cstring(cmd.cwd.as_os_str().as_bytes(), "the folder")?,
    })
}

/// Starts `cmd` as pid 1 of a new PID namespace and a session leader. Returns once the
/// program is executing, or with the error that prevented it (a program that cannot be
/// executed is an error here, not an exit code later).
pub fn spawn_pid_ns_init(cmd: &PidNsCommand) -> io::Result<PidNsChild> {
    let prepared = prepare(cmd)?;
    let mut argv: Vec<*const libc::c_char> = prepared.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = prepared.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let null = std::fs::File::open("/dev/null")?;

    // The child reports a failed exec on this pipe; a successful exec closes it (O_CLOEXEC).
    let mut ends = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (report_rx, report_tx) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };

    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    let fds = [
        null.as_raw_fd(),
        cmd.stdout.as_raw_fd(),
        cmd.stderr.as_raw_fd(),
    ];
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a copy of this
    // thread's memory. It then calls only async-signal-safe functions on data prepared above
    // and ends in execve or _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        // SAFETY: see above; every pointer refers to memory copied into this child.
        unsafe {
            child(
                &fds,
                &prepared,
                argv.as_ptr(),
                envp.as_ptr(),
                cmd.umask,
                report_tx.as_raw_fd(),
            )
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = pid as i32;
    drop(report_tx);
    // SAFETY: CLONE_PIDFD stored a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut errno = [0u8; 4];
    let n = loop {
        // SAFETY: read(2) into a buffer we own.
        let n = unsafe { libc::read(report_rx.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n == 0 {
        return Ok(PidNsChild { pid, pidfd });
    }
    // The exec failed: the child has exited (or is about to); reap it.
    let _ = wait_pidfd(&pidfd);
    let err = if n == 4 {
        io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
    } else {
        io::Error::other("the child ended before executing the program")
    };
    Err(io::Error::new(
        err.kind(),
        format!(
            "cannot execute {}: {err}",
            Path::new(&cmd.program).display()
        ),
    ))
}

/// The child between clone3 and execve. Never returns.
///
/// # Safety
/// Only in a child created by `clone3` without `CLONE_VM`, with pointers into its own copy of
/// the parent's memory.
unsafe fn child(
    fds: &[RawFd; 3],
    prepared: &Prepared,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    umask: u32,
    report: RawFd,
) -> ! {
    let fail = |report: RawFd| -> ! {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(report, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    };
    // The caller's signal mask and ignored signals would be inherited by the program; start
    // it as a fresh process would start.
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    for (target, fd) in fds.iter().enumerate() {
        // dup2 onto itself would keep O_CLOEXEC set: clear the flag instead.
        if *fd == target as RawFd {
            if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                fail(report);
            }
        } else if libc::dup2(*fd, target as RawFd) < 0 {
            fail(report);
        }
    }
    if libc::chdir(prepared.cwd.as_ptr()) != 0 {
        fail(report);
    }
    libc::umask(umask as libc::mode_t);
    if libc::setsid() < 0 {
        fail(report);
    }
    libc::execve(prepared.path.as_ptr(), argv, envp);
    fail(report)
}

/// Reaps the process of `pidfd` once it has ended (call it when the pidfd is readable, or to
/// wait for the end). `None` if it was reaped already.
pub fn wait_pidfd(pidfd: &OwnedFd) -> Option<ExitKind> {
    loop {
        // SAFETY: waitid(2) fills a siginfo_t we own.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if rc != 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        // SAFETY: after a successful waitid with WEXITED, si_status is set.
        let status = unsafe { info.si_status() };
        return Some(match info.si_code {
            libc::CLD_EXITED => ExitKind::Code(status),
            _ => ExitKind::Signal(status),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn command(program: &str, args: &[&str]) -> (PidNsCommand, std::fs::File) {
        let (rx, tx) = std::io::pipe().unwrap();
        let tx2 = tx.try_clone().unwrap();
        let cmd = PidNsCommand {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: vec![("DVS_SPAWN_TEST".into(), "42".into())],
            cwd: "/".into(),
            stdout: tx.into(),
            stderr: tx2.into(),
            umask: 0o027,
        };
        (cmd, std::fs::File::from(OwnedFd::from(rx)))
    }

    /// Needs root (CLONE_NEWPID); skipped otherwise.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn the_program_is_pid_1_of_its_namespace_a_session_leader_with_its_env_folder_and_umask() {
        if !root() {
            return;
        }
        let (cmd, mut out) = command(
            "sh",
            &[
                "-c",
                "echo pid=$$ sid=$(cut -d' ' -f6 /proc/self/stat) env=$DVS_SPAWN_TEST cwd=$(pwd) umask=$(umask); exit 7",
            ],
        );
        let child = spawn_pid_ns_init(&cmd).unwrap();
        drop(cmd);
        assert_eq!(wait_pidfd(&child.pidfd), Some(ExitKind::Code(7)));
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        // $$ is 1 inside the namespace; /proc (the host's) shows its session as its host pid.
        assert!(
            text.starts_with(&format!("pid=1 sid={} ", child.pid)),
            "{text}"
        );
        assert!(text.contains("env=42 cwd=/ umask=0027"), "{text}");
        assert_eq!(crate::ns_pid(child.pid).ok().flatten(), None, "reaped");
    }

    #[test]
    fn a_program_that_cannot_run_is_an_error_naming_it() {
        if !root() {
            return;
        }
        let (cmd, _out) = command("/nonexistent/dvs-no-such-program", &[]);
        let err = spawn_pid_ns_init(&cmd).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/dvs-no-such-program"),
            "{err}"
        );
        let (cmd, _out) = command("dvs-no-such-program-in-path", &[]);
        let err = spawn_pid_ns_init(&cmd).unwrap_err();
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }

    #[test]
    fn a_killed_program_reports_its_signal() {
        if !root() {
            return;
        }
        let (cmd, _out) = command("sleep", &["30"]);
        let child = spawn_pid_ns_init(&cmd).unwrap();
        // SAFETY: kill(2) on the child we just started.
        assert_eq!(unsafe { libc::kill(child.pid, libc::SIGKILL) }, 0);
        assert_eq!(
            wait_pidfd(&child.pidfd),
            Some(ExitKind::Signal(libc::SIGKILL))
        );
    }
}
