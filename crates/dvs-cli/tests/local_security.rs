//! Local security, tested as an attacker on the same machine: each test tries something that
//! used to work against a node kernel or `dvs up` and checks that the harm did not happen.
//!
//! An unprivileged caller is a forked child that drops to uid 65534 (nobody) and connects a
//! socket the test process created beforehand: the node kernel sees the child's credentials
//! (captured at `connect`) while the test keeps using the connection.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::examples::example_bin;
use common::{dvs, errno, eventually, Cluster};
use dvs_config::{ClusterConfig, NodeConfig};
use m3ipc::Errno;
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Mode bits (permissions, setuid/setgid/sticky) of `p`, not following a symlink.
fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A connection made by a child process running as another user; the child stays alive
/// (blocked) until this is dropped, so that the node can look at its /proc entry.
struct Foreign {
    stream: Option<UnixStream>,
    child: libc::pid_t,
    hold: libc::c_int,
}

impl Foreign {
    fn take(&mut self) -> UnixStream {
        self.stream.take().expect("stream taken once")
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        // SAFETY: closing our pipe end lets the child exit; then it is reaped.
        unsafe {
            libc::close(self.hold);
            libc::waitpid(self.child, std::ptr::null_mut(), 0);
        }
    }
}

/// A stream connected to the Unix socket `path` by a child running as `uid`/`gid` with
/// supplementary groups `groups`; `Err(errno)` when that child's `connect` failed.
fn connect_as(path: &Path, uid: u32, gid: u32, groups: &[u32]) -> Result<Foreign, i32> {
    use std::os::unix::ffi::OsStrExt;
    // Everything the child needs is prepared here: after fork it only makes system calls.
    // SAFETY: plain libc calls on values owned by this function.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket() failed");
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let groups: Vec<libc::gid_t> = groups.to_vec();
        // report: the child's verdict; hold: keeps the child alive until closed.
        let (mut report, mut hold) = ([0; 2], [0; 2]);
        assert_eq!(libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC), 0);
        assert_eq!(libc::pipe2(hold.as_mut_ptr(), libc::O_CLOEXEC), 0);
        let pid = libc::fork();
        assert!(pid >= 0, "fork() failed");
        if pid == 0 {
            libc::close(hold[1]);
            let code: u8 = if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                255
            } else if libc::connect(
                fd,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) == 0
            {
                0
            } else {
                (*libc::__errno_location()).clamp(1, 254) as u8
            };
            libc::write(report[1], &code as *const u8 as *const libc::c_void, 1);
            let mut b = 0u8;
            libc::read(hold[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
        libc::close(report[1]);
        libc::close(hold[0]);
        let mut code = 255u8;
        libc::read(report[0], &mut code as *mut u8 as *mut libc::c_void, 1);
        libc::close(report[0]);
        // One owner of the child and of `hold`: its drop closes `hold` once and reaps the
        // child. (Building a second `Foreign` from the first with `..` closed `hold` twice,
        // and the second close could hit a descriptor another test thread had just opened.)
        let mut child = Foreign {
            stream: None,
            child: pid,
            hold: hold[1],
        };
        assert_ne!(code, 255, "the child could not drop to uid {uid}");
        if code == 0 {
            child.stream = Some(UnixStream::from_raw_fd(fd));
            Ok(child)
        } else {
            libc::close(fd);
            Err(code as i32)
        }
    }
}

/// Sends one control request on `s` and reads one answer line.
fn ctl_call(s: &mut UnixStream, req: &Value) -> Value {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).expect("cannot send a control request");
    let mut answer = String::new();
    BufReader::new(&*s)
        .read_line(&mut answer)
        .expect("no answer to a control request");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
}

fn node_answers_status(node: &NodeConfig) -> bool {
    let Ok(mut s) = UnixStream::connect(node.ctl_socket()) else {
        return false;
    };
    ctl_call(&mut s, &serde_json::json!({"op": "status"}))["kind"] == "status"
}

/// Where node `node` keeps its checkpoint images (see dvs-node's migrate module).
fn images_root(cfg: &ClusterConfig, node: &NodeConfig) -> PathBuf {
    let shm = Path::new("/dev/shm/dvs")
        .join(&cfg.cluster_id)
        .join(&node.name);
    if shm.is_dir() {
        shm
    } else {
        node.runtime_dir.join("migrations")
    }
}

/// The files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push(p.clone());
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn sockets_and_files_are_private_even_under_umask_000() {
    let c = Cluster::start_under_umask(Some(0));
    assert_eq!(mode(&c.config_path()), 0o600, "cluster.toml");
    // Let others traverse the cluster folder, so that only the node's own modes stop them.
    std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for n in &c.cfg.nodes {
        assert_eq!(mode(&n.runtime_dir), 0o700, "{}", n.runtime_dir.display());
        for p in [
            n.ipc_socket(),
            n.ctl_socket(),
            n.runtime_dir.join("node.pid"),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
            assert_eq!(std::fs::metadata(&p).unwrap().uid(), 0, "{}", p.display());
        }
        let images = images_root(&c.cfg, n);
        for d in images
            .ancestors()
            .take_while(|a| a.starts_with("/dev/shm/dvs"))
        {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        assert_eq!(mode(&images), 0o700, "{}", images.display());
        // Nobody reaches either socket.
        for p in [n.ipc_socket(), n.ctl_socket()] {
            let r = connect_as(&p, NOBODY, NOBODY, &[]);
            assert_eq!(r.err(), Some(libc::EACCES), "{}", p.display());
        }
    }
}

#[test]
fn the_admin_group_gets_0660_sockets_and_control() {
    // `adm` (gid 4) exists on Debian; a test group would need a change to /etc/group.
    let adm = 4;
    let c = Cluster::start_with(|cfg| cfg.access.admin_group = Some("adm".into()));
    std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let n = c.node(0);
    assert_eq!(mode(&n.runtime_dir), 0o710);
    assert_eq!(std::fs::metadata(&n.runtime_dir).unwrap().gid(), adm);
    for p in [n.ipc_socket(), n.ctl_socket()] {
        assert_eq!(mode(&p), 0o660, "{}", p.display());
        assert_eq!(std::fs::metadata(&p).unwrap().gid(), adm, "{}", p.display());
    }
    // A member through a supplementary group may ask for status.
    let mut member = connect_as(&n.ctl_socket(), NOBODY, NOBODY, &[adm]).expect("member connects");
    let a = ctl_call(&mut member.take(), &serde_json::json!({"op": "status"}));
    assert_eq!(a["kind"], "status", "{a}");
    // Someone outside the group does not reach the socket.
    let r = connect_as(&n.ctl_socket(), NOBODY, NOBODY, &[]);
    assert_eq!(r.err(), Some(libc::EACCES));
}

#[test]
fn a_non_root_caller_cannot_run_shut_down_or_bind() {
    let c = Cluster::start();
    let n = c.node(0).clone();
    // As if the socket modes had gone wrong (the old umask attack): the node's own checks
    // must still refuse.
    for d in [c.dir(), &n.runtime_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for p in [n.ipc_socket(), n.ctl_socket()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let marker = c.dir().join("pwned");
    let mut nobody = connect_as(&n.ctl_socket(), NOBODY, NOBODY, &[]).expect("connect");
    let mut s = nobody.take();
    let run = serde_json::json!({
        "op": "run", "dc": 0, "ep": 7, "wait": false,
        "cmd": ["/bin/sh", "-c", format!("touch {}", marker.display())],
    });
    for req in [
        run,
        serde_json::json!({"op": "shutdown"}),
        serde_json::json!({"op": "status"}),
        serde_json::json!({"op": "register", "dc": 0, "ep": 9, "at": 1, "backup": false}),
    ] {
        let a = ctl_call(&mut s, &req);
        assert_eq!(a["kind"], "error", "{req} -> {a}");
        let msg = a["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("permission denied") && msg.contains("root"),
            "{msg}"
        );
    }
    c.wait_log(0, "refused: permission denied", 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "the refused command ran");
    assert!(node_answers_status(&n), "the node stopped");
    let ps = c.dvs(&["ps", "--json"]);
    assert!(!printed(&ps).contains("pwned"), "{}", printed(&ps));
    // Binding as nobody: refused by the node, nothing registered.
    let mut nobody = connect_as(&n.ipc_socket(), NOBODY, NOBODY, &[]).expect("connect");
    assert_eq!(
        errno(m3ipc::Endpoint::bind_stream(nobody.take(), 0, 4)),
        Errno::Permission
    );
    assert!(Cluster::registrations(&c.status(), 0, 4).is_empty());
    // Root (the default bind_uids) still binds.
    let _ep = c.bind(0, 4);
}

#[test]
fn a_launched_process_binds_only_its_own_endpoint() {
    let c = Cluster::start();
    let server = example_bin("migr-server").display().to_string();
    let socket = c.node(0).ipc_socket().display().to_string();
    // Launched for dc0/1, it tries to take dc0/2.
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "1", "--node", "node0", "--wait", "--", &server, "--dc", "0",
        "--ep", "2", "--socket", &socket,
    ]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("cannot bind") && printed(&out).contains("permission denied"),
        "{}",
        printed(&out)
    );
    assert!(Cluster::registrations(&c.status(), 0, 2).is_empty());
    c.wait_log(0, "bind of 0/2 refused", 0);
    // Its own endpoint works.
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "3", "--node", "node0", "--", &server,
    ]);
    assert!(out.status.success(), "{}", printed(&out));
    eventually("dc0/3 running on node0", || {
        Cluster::registrations(&c.status(), 0, 3)
            .contains(&(0, "RUNNING".into()))
            .then_some(())
    });
    // And the root test process binds another one.
    let _ep = c.bind(0, 2);
}

/// Runs a cooperative migration of dc0/1 from node0 to node1, `fail_at` a phase or not;
/// returns whether it committed.
fn migrate(c: &Cluster, fail_at: Option<&str>) -> bool {
    let mut args = vec![
        "migrate",
        "dc0/1",
        "--to",
        "node1",
        "--backend",
        "cooperative",
        "--json",
    ];
    if let Some(f) = fail_at {
        args.extend(["--fail-at", f]);
    }
    let out = c.dvs(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", printed(&out)));
    report["committed"].as_bool().expect("committed field")
}

#[test]
fn no_image_is_left_after_a_committed_or_rolled_back_migration() {
    let c = Cluster::start();
    let server = example_bin("migr-server").display().to_string();
    let out = c.dvs(&[
        "run", "--dc", "dc0", "--ep", "1", "--node", "node0", "--", &server,
    ]);
    assert!(out.status.success(), "{}", printed(&out));
    eventually("dc0/1 running on node0", || {
        Cluster::registrations(&c.status(), 0, 1)
            .contains(&(0, "RUNNING".into()))
            .then_some(())
    });
    let roots: Vec<PathBuf> = c.cfg.nodes.iter().map(|n| images_root(&c.cfg, n)).collect();
    let empty = |what: &str| {
        eventually(what, || {
            roots
                .iter()
                .all(|r| files_under(r).is_empty())
                .then_some(())
        });
        for r in &roots {
            assert_eq!(mode(r), 0o700, "{}", r.display());
        }
    };
    assert!(
        !migrate(&c, Some("restore")),
        "the failed migration committed"
    );
    empty("no image left after the rollback");
    assert!(migrate(&c, None), "the migration did not commit");
    empty("no image left after the commit");
    // A stale image (a node that died mid-migration) is deleted when the node starts again.
    let stale = roots[2].join("deadbeef");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("pages-1.img"), b"secret").unwrap();
    c.kill_node(2);
    c.restart_node(2);
    eventually("the stale image deleted at start-up", || {
        (!stale.exists() && node_answers_status(c.node(2))).then_some(())
    });
}

#[test]
fn an_over_long_control_line_is_refused_and_the_node_stays_up() {
    let c = Cluster::start();
    let n = c.node(0).clone();
    let s = UnixStream::connect(n.ctl_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    // 8 MiB with no newline; the node must not buffer it, and may close before it is sent.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..128 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer).expect("an answer");
    // Then the connection is closed (a reset, since our unread bytes were dropped).
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "more after the error: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    writer.join().unwrap();
    let first: Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"));
    assert_eq!(first["kind"], "error");
    assert!(
        first["message"].as_str().unwrap().contains("too long"),
        "{first}"
    );
    assert!(node_answers_status(&n));
}

#[test]
fn dvs_up_refuses_an_unsafe_folder_and_a_planted_symlink() {
    let base = tempfile::Builder::new()
        .prefix("dvs-sec-")
        .tempdir_in("/tmp")
        .unwrap();
    let up = |dir: &Path| dvs(&["--dir", dir.to_str().unwrap(), "up", "--nodes", "1"]);
    // World-writable.
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = up(&open);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("lets other users write"),
        "{}",
        printed(&out)
    );
    assert!(!open.join("cluster.toml").exists());
    // Owned by someone else.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = up(&theirs);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("owned by uid 65534"),
        "{}",
        printed(&out)
    );
    assert!(!theirs.join("cluster.toml").exists());
    // A cluster.toml symlink to a file elsewhere.
    let mine = base.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    let victim = base.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, mine.join("cluster.toml")).unwrap();
    let out = up(&mine);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(printed(&out).contains("symlink"), "{}", printed(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!mine.join("node0").exists(), "a node was started");
}

#[test]
fn unsafe_names_and_runtime_dirs_are_refused() {
    let dir = tempfile::Builder::new()
        .prefix("dvs-sec-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path();
    // A node named like a path: refused at validation, naming the key.
    let mut cfg = ClusterConfig::local(root, 1, 29_990);
    let text = cfg
        .to_toml()
        .replace("name = \"node0\"", "name = \"/tmp/x\"");
    let path = root.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = dvs(&["--config", path.to_str().unwrap(), "node", "--node", "0"]);
    assert!(!out.status.success());
    assert!(
        printed(&out).contains("`node[0].name`") && printed(&out).contains("/tmp/x"),
        "{}",
        printed(&out)
    );
    // A runtime dir that is a symlink, then one owned by someone else.
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    cfg.nodes[0].runtime_dir = root.join("rt");
    std::os::unix::fs::symlink(&elsewhere, root.join("rt")).unwrap();
    let path = root.join("cluster.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let node = || dvs(&["--config", path.to_str().unwrap(), "node", "--node", "0"]);
    let out = node();
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(printed(&out).contains("symlink"), "{}", printed(&out));
    assert!(!elsewhere.join("ipc.sock").exists());
    std::fs::remove_file(root.join("rt")).unwrap();
    std::fs::create_dir(root.join("rt")).unwrap();
    std::os::unix::fs::chown(root.join("rt"), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = node();
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("owned by uid 65534"),
        "{}",
        printed(&out)
    );
    assert!(!root.join("rt").join("ipc.sock").exists());
}
