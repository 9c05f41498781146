//! Real checkpoint/restore with CRIU. Each test that needs criu skips (with a printed reason)
//! when not run as root or when no working criu >= 4.2 is found (`scripts/install-criu.sh`).
//!
//! The process under test is `dvs-ckpt-testee` started as a migratable process, talking to the
//! test over a unix socket at its fd 0: the socket's peer is outside the dumped tree, so the
//! external-unix dump and inherit-fd restore path is exercised.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use dvs_checkpoint::{
    kill_tree, migratable_command, ns_pid, pid_namespace_init, process_socket_inodes,
    process_state, resume_tree, socket_inode, CheckpointBackend, CheckpointError, Criu,
    DumpRequest, RestoreRequest,
};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn criu_or_skip(test: &str) -> Option<Criu> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {test}: needs root (criu ptraces and creates namespaces)");
        return None;
    }
    let criu = match Criu::locate() {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP {test}: {e}");
            return None;
        }
    };
    if let Err(e) = criu.check() {
        println!("SKIP {test}: criu does not work here: {e}");
        return None;
    }
    become_subreaper();
    Some(criu)
}

/// Restored trees are reparented to us when criu exits, so we can reap them instead of
/// leaving zombies with init.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(
            rc,
            0,
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// Kills a restored tree and reaps its root if it became our child.
fn kill_and_reap(pid: i32) {
    kill_tree(pid).unwrap();
    let me = std::process::id() as i32;
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
        });
    if ppid == Some(me) {
        let mut status = 0;
        // SAFETY: waitpid on a specific child of ours.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

struct Testee {
    /// The `unshare` process, our child.
    unshare: Child,
    /// Host pid of the namespace's init: the testee itself.
    init: i32,
    /// Our end of its socket.
    sock: UnixStream,
    /// Inode of its end of the socket (what criu calls `socket:[INODE]`).
    ino: u64,
}

impl Drop for Testee {
    fn drop(&mut self) {
        // Only while unshare still runs is `init` surely still the testee's pid.
        if let Ok(None) = self.unshare.try_wait() {
            let _ = kill_tree(self.init);
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
    }
}

fn start_testee(ballast_mib: usize) -> Testee {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let ino = socket_inode(&theirs).unwrap();
    let mut cmd = migratable_command(env!("CARGO_BIN_EXE_dvs-ckpt-testee"));
    cmd.args(["--ballast-mib", &ballast_mib.to_string()])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let unshare = cmd.spawn().expect("spawn unshare");
    let init = pid_namespace_init(unshare.id() as i32, Duration::from_secs(10)).unwrap();
    let mut t = Testee {
        unshare,
        init,
        sock: ours,
        ino,
    };
    // Its answer proves it has exec'd and built its ballast: a stable point to dump at.
    assert_eq!(
        ask(&mut t.sock, b'p'),
        1,
        "testee should be pid 1 of its namespace"
    );
    t
}

fn ask(sock: &mut UnixStream, req: u8) -> u64 {
    sock.write_all(&[req]).unwrap();
    let mut b = [0u8; 8];
    sock.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[test]
fn dump_leave_stopped_kill_then_restore_on_new_socket() {
    let Some(criu) = criu_or_skip("dump_leave_stopped_kill_then_restore_on_new_socket") else {
        return;
    };
    let mut t = start_testee(0);
    for want in 1..=3 {
        assert_eq!(ask(&mut t.sock, b'n'), want);
    }
    // The inode we know from our side is the one /proc shows for its fd 0.
    let socks = process_socket_inodes(t.init).unwrap();
    assert!(
        socks.contains(&(0, t.ino)),
        "{socks:?} should hold fd 0 = socket:[{}]",
        t.ino
    );

    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    let mut req = DumpRequest::new(t.init, &images);
    req.leave_stopped = true;
    req.external_unix_inodes = vec![t.ino];
    let dump = criu.dump(&req).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "criu {}: dump of a small process: {:?}, images {} bytes ({:.2} MiB)",
        criu.version(),
        dump.duration,
        dump.image_bytes,
        mib(dump.image_bytes)
    );
    assert!(dump.left_stopped);
    assert_eq!(
        process_state(t.init).unwrap(),
        'T',
        "source should be left stopped"
    );

    // Commit: kill the stopped source. Its socket closes: our old end sees EOF.
    kill_tree(t.init).unwrap();
    t.unshare.wait().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        t.sock.read(&mut buf).unwrap(),
        0,
        "old connection should see EOF"
    );

    // Restore with a fresh connection in place of the old one.
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let rreq = RestoreRequest::new(&images).inherit_unix_socket(theirs.as_raw_fd(), t.ino);
    let restored = criu.restore(&rreq).unwrap_or_else(|e| panic!("{e}"));
    drop(theirs);
    println!(
        "criu {}: restore of a small process: {:?}",
        criu.version(),
        restored.duration
    );

    assert_eq!(
        ask(&mut ours, b'n'),
        4,
        "counter should continue after restore"
    );
    assert_eq!(ask(&mut ours, b'n'), 5);
    assert_eq!(
        ask(&mut ours, b'p'),
        1,
        "in-namespace pid should be preserved"
    );
    assert_eq!(ns_pid(restored.pid).unwrap(), Some(1));
    assert!(restored.waiter.is_none());
    kill_and_reap(restored.pid);
}

#[test]
fn rollback_resumes_the_stopped_source_on_its_old_socket() {
    let Some(criu) = criu_or_skip("rollback_resumes_the_stopped_source_on_its_old_socket") else {
        return;
    };
    let mut t = start_testee(0);
    assert_eq!(ask(&mut t.sock, b'n'), 1);
    let dir = tempfile::tempdir().unwrap();
    let mut req = DumpRequest::new(t.init, dir.path().join("img"));
    req.leave_stopped = true;
    req.external_unix_inodes = vec![t.ino];
    let dump = criu.dump(&req).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "criu: dump (for rollback): {:?}, {} bytes",
        dump.duration, dump.image_bytes
    );
    // criu detaches with SIGSTOP queued: the state turns to T as the signal is delivered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while process_state(t.init).unwrap() != 'T' && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(process_state(t.init).unwrap(), 'T');

    // A request sent while it is stopped waits in the socket and is answered after resume.
    t.sock.write_all(b"n").unwrap();
    resume_tree(t.init).unwrap();
    let mut b = [0u8; 8];
    t.sock.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 2);
    assert_eq!(ask(&mut t.sock, b'n'), 3);
}

#[test]
fn dump_killing_source_then_attached_restore_of_64mib_process() {
    let Some(criu) = criu_or_skip("dump_killing_source_then_attached_restore_of_64mib_process")
    else {
        return;
    };
    let mut t = start_testee(64);
    assert_eq!(ask(&mut t.sock, b'n'), 1);
    let sum = ask(&mut t.sock, b'c');

    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    let mut req = DumpRequest::new(t.init, &images);
    req.external_unix_inodes = vec![t.ino];
    let dump = criu.dump(&req).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "criu: dump of a 64 MiB process: {:?}, images {:.1} MiB",
        dump.duration,
        mib(dump.image_bytes)
    );
    assert!(dump.image_bytes > 64 << 20);
    // Without --leave-stopped criu kills the source; unshare then exits.
    t.unshare.wait().unwrap();

    // Restoring without a replacement for the external socket fails, and says so.
    let err = criu.restore(&RestoreRequest::new(&images)).unwrap_err();
    println!("criu: restore without inherit-fd fails as expected: {err}");
    match &err {
        CheckpointError::RestoreFailed {
            reason, log_tail, ..
        } => {
            assert!(!reason.is_empty() && !log_tail.is_empty())
        }
        other => panic!("expected RestoreFailed, got {other:?}"),
    }

    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut rreq = RestoreRequest::new(&images).inherit_unix_socket(theirs.as_raw_fd(), t.ino);
    rreq.detached = false;
    let mut restored = criu.restore(&rreq).unwrap_or_else(|e| panic!("{e}"));
    drop(theirs);
    println!(
        "criu: attached restore of a 64 MiB process: {:?}",
        restored.duration
    );
    assert_eq!(ask(&mut ours, b'n'), 2);
    assert_eq!(ask(&mut ours, b'c'), sum, "ballast should survive");

    // Attached: criu is the tree's parent and ends when the tree does.
    let mut waiter = restored
        .waiter
        .take()
        .expect("attached restore returns criu");
    kill_tree(restored.pid).unwrap();
    let status = waiter.wait().unwrap();
    println!("criu: attached restore's criu exited with {status} after the tree was killed");
}

#[test]
fn dump_of_nonexistent_pid_is_a_typed_error() {
    let Some(criu) = criu_or_skip("dump_of_nonexistent_pid_is_a_typed_error") else {
        return;
    };
    let pid = (400_000..i32::MAX)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = criu
        .dump(&DumpRequest::new(pid, dir.path().join("img")))
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::NoSuchProcess { pid: p } if p == pid),
        "{err:?}"
    );
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
}

#[test]
fn dump_of_a_non_session_leader_reports_criu_reason() {
    let Some(criu) = criu_or_skip("dump_of_a_non_session_leader_reports_criu_reason") else {
        return;
    };
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = criu
        .dump(&DumpRequest::new(
            sleeper.id() as i32,
            dir.path().join("img"),
        ))
        .unwrap_err();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    println!("criu: dump of a plain child fails as expected: {err}");
    match &err {
        CheckpointError::DumpFailed {
            reason, log_tail, ..
        } => {
            assert!(reason.contains("session leader"), "reason: {reason}");
            assert!(log_tail.contains("Dumping FAILED"), "tail: {log_tail}");
        }
        other => panic!("expected DumpFailed, got {other:?}"),
    }
}

#[test]
fn requests_are_validated_before_running_criu() {
    let Some(criu) = criu_or_skip("requests_are_validated_before_running_criu") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("inventory.img"), b"stale").unwrap();
    let me = std::process::id() as i32;
    assert!(matches!(
        criu.dump(&DumpRequest::new(me, &images)),
        Err(CheckpointError::InvalidRequest(_))
    ));
    // An fd that is not open here cannot be passed.
    let bad = RestoreRequest::new(&images).inherit_unix_socket(1_000_000, 1);
    assert!(matches!(
        criu.restore(&bad),
        Err(CheckpointError::InvalidRequest(_))
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        criu.restore(&RestoreRequest::new(empty.path())),
        Err(CheckpointError::InvalidRequest(_))
    ));
    // The trait object works too (the node daemon holds backends as `dyn`).
    let backend: &dyn CheckpointBackend = &criu;
    assert_eq!(backend.name(), "criu");
    assert_eq!(backend.check().unwrap(), criu.version());
}
