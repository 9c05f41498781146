//! The preflight's rules on hand-made inventories.

use super::*;
use crate::inventory::{InetSocket, OpenFd, ProcResources, UnixSocket};

const NODE_PEER: u64 = 900;

fn fd(fd: i32, target: FdTarget, read: bool, write: bool) -> OpenFd {
    OpenFd {
        fd,
        target,
        read,
        write,
    }
}

/// A tree of one process (pid 10) holding its node connection (socket 100) and `more`.
fn tree(more: Vec<OpenFd>) -> Inventory {
    let mut fds = vec![fd(3, FdTarget::Socket(100), true, true)];
    fds.extend(more);
    let mut inv = Inventory {
        root: 10,
        procs: vec![ProcResources {
            pid: 10,
            comm: "srv".into(),
            cwd: Some("/run/dvs/node0".into()),
            fds,
            maps: Vec::new(),
        }],
        ..Default::default()
    };
    inv.unix.insert(100, unix(100, Some(NODE_PEER)));
    inv
}

fn unix(inode: u64, peer: Option<u64>) -> UnixSocket {
    UnixSocket {
        inode,
        kind: 1,
        state: 1,
        name: None,
        peer,
    }
}

fn inet(inode: u64, proto: Proto, local: &str, remote: &str, state: u8) -> InetSocket {
    InetSocket {
        inode,
        proto,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state,
    }
}

fn src() -> Source {
    Source {
        node: "node0".into(),
        node_sockets: [NODE_PEER].into(),
        addrs: vec!["127.0.0.1".parse().unwrap(), "10.9.0.1".parse().unwrap()],
        substituted: vec!["/run/dvs/node0".into()],
        travelling: Vec::new(),
    }
}

fn elsewhere() -> Destination {
    Destination {
        node: "node1".into(),
        addrs: vec!["127.0.0.1".parse().unwrap(), "10.9.0.2".parse().unwrap()],
        shares_network: false,
        path_problems: Vec::new(),
    }
}

fn same_machine() -> Destination {
    Destination {
        shares_network: true,
        ..elsewhere()
    }
}

fn refused(r: Result<Plan, Vec<Obstacle>>) -> String {
    match r {
        Ok(p) => panic!("not refused: {p:?}"),
        Err(o) => o
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[test]
fn a_plain_server_travels_with_its_node_connection() {
    let inv = tree(vec![fd(
        0,
        FdTarget::Device("/dev/null".into()),
        true,
        false,
    )]);
    let plan = judge(&inv, &src(), Some(&elsewhere())).unwrap();
    assert_eq!(plan.node_connection, 100);
    assert!(!plan.tcp_established && plan.ghost_limit.is_none());
    assert!(plan.unchecked.is_empty());
    let plan = judge(&inv, &src(), None).unwrap();
    assert_eq!(plan.unchecked.len(), 1, "{plan:?}");
}

#[test]
fn another_external_unix_socket_or_a_second_node_connection_is_refused() {
    let mut inv = tree(vec![
        fd(4, FdTarget::Socket(101), true, true),
        fd(5, FdTarget::Socket(102), true, true),
    ]);
    inv.unix.insert(101, unix(101, Some(555)));
    inv.unix.insert(102, unix(102, Some(NODE_PEER + 1)));
    let mut s = src();
    s.node_sockets.insert(NODE_PEER + 1);
    let e = refused(judge(&inv, &s, None));
    assert!(
        e.contains("unix socket socket:[101] (pid 10 (srv) fd 4), whose peer is outside"),
        "{e}"
    );
    assert!(
        e.contains("a second connection to the node kernel (socket:[102])"),
        "{e}"
    );
}

#[test]
fn a_socketpair_inside_the_tree_travels() {
    let mut inv = tree(vec![
        fd(4, FdTarget::Socket(101), true, true),
        fd(5, FdTarget::Socket(102), true, true),
    ]);
    inv.unix.insert(101, unix(101, Some(102)));
    inv.unix.insert(102, unix(102, Some(101)));
    judge(&inv, &src(), Some(&elsewhere())).unwrap();
}

#[test]
fn a_loopback_connection_out_of_the_tree_is_refused_naming_it() {
    let mut inv = tree(vec![fd(4, FdTarget::Socket(200), true, true)]);
    inv.inet.insert(
        200,
        inet(
            200,
            Proto::Tcp,
            "127.0.0.1:40112",
            "127.0.0.1:5432",
            tcp_state::ESTABLISHED,
        ),
    );
    let e = refused(judge(&inv, &src(), Some(&elsewhere())));
    assert_eq!(
        e,
        "TCP connection 127.0.0.1:40112 -> 127.0.0.1:5432 (pid 10 (srv) fd 4), whose other end stays on node0"
    );
    // To this host's own address: the same.
    inv.inet.insert(
        200,
        inet(200, Proto::Tcp, "10.9.0.1:40112", "10.9.0.1:5432", 1),
    );
    assert!(refused(judge(&inv, &src(), None)).contains("stays on node0"));
    // Elsewhere: no network lock, refused too.
    inv.inet.insert(
        200,
        inet(200, Proto::Tcp, "10.9.0.1:40112", "10.9.0.7:5432", 1),
    );
    assert!(refused(judge(&inv, &src(), None)).contains("network lock"));
}

#[test]
fn a_connection_inside_the_tree_needs_tcp_established_and_another_network() {
    let mut inv = tree(vec![
        fd(4, FdTarget::Socket(200), true, true),
        fd(5, FdTarget::Socket(201), true, true),
    ]);
    inv.inet.insert(
        200,
        inet(200, Proto::Tcp, "127.0.0.1:40112", "127.0.0.1:5432", 1),
    );
    inv.inet.insert(
        201,
        inet(201, Proto::Tcp, "127.0.0.1:5432", "127.0.0.1:40112", 1),
    );
    let plan = judge(&inv, &src(), Some(&elsewhere())).unwrap();
    assert!(plan.tcp_established);
    let e = refused(judge(&inv, &src(), Some(&same_machine())));
    assert!(
        e.contains("cannot be restored on node1: it shares this host's network"),
        "{e}"
    );
}

#[test]
fn listeners_need_their_address_and_their_port_free() {
    let mut inv = tree(vec![fd(4, FdTarget::Socket(300), true, true)]);
    inv.inet.insert(
        300,
        inet(
            300,
            Proto::Tcp,
            "0.0.0.0:8080",
            "0.0.0.0:0",
            tcp_state::LISTEN,
        ),
    );
    judge(&inv, &src(), Some(&elsewhere())).unwrap();
    let e = refused(judge(&inv, &src(), Some(&same_machine())));
    assert!(
        e.starts_with(
            "TCP listener on 0.0.0.0:8080 (pid 10 (srv) fd 4), whose port cannot be taken on node1"
        ),
        "{e}"
    );
    inv.inet.insert(
        300,
        inet(
            300,
            Proto::Tcp,
            "10.9.0.1:8080",
            "0.0.0.0:0",
            tcp_state::LISTEN,
        ),
    );
    assert_eq!(
        needs(&inv, &src()).addrs,
        vec!["10.9.0.1".parse::<IpAddr>().unwrap()]
    );
    let e = refused(judge(&inv, &src(), Some(&elsewhere())));
    assert!(e.ends_with("an address node1 does not have"), "{e}");
    inv.inet.insert(
        300,
        inet(
            300,
            Proto::Udp,
            "10.9.0.2:53",
            "0.0.0.0:0",
            tcp_state::CLOSE,
        ),
    );
    judge(&inv, &src(), Some(&elsewhere())).unwrap();
}

#[test]
fn pipes_need_both_ends_in_the_tree() {
    let inv = tree(vec![
        fd(0, FdTarget::Pipe(7), true, false),
        fd(5, FdTarget::Pipe(8), true, false),
        fd(6, FdTarget::Pipe(8), false, true),
    ]);
    let e = refused(judge(&inv, &src(), None));
    assert_eq!(
        e,
        "pipe:[7] (pid 10 (srv) fd 0), read end, whose other end is outside the process tree"
    );
}

#[test]
fn deleted_files_travel_up_to_the_ghost_limit() {
    let file = |mb: u64| FileRef {
        path: "/tmp/scratch".into(),
        deleted: true,
        size: Some(mb << 20),
        allocated: Some(mb << 20),
    };
    let mut inv = tree(vec![fd(4, FdTarget::File(file(3)), true, false)]);
    let plan = judge(&inv, &src(), None).unwrap();
    assert_eq!(plan.ghost_limit, Some(3 << 20));
    inv.procs[0].maps.push(FileRef {
        path: "/tmp/big.bin".into(),
        ..file(40)
    });
    let e = refused(judge(&inv, &src(), None));
    assert!(e.starts_with("deleted file /tmp/big.bin (mapped) (pid 10 (srv)), 40.0 MiB, which criu would have to copy"), "{e}");
}

#[test]
fn files_must_exist_on_the_destination_unless_substituted() {
    let mut inv = tree(vec![
        fd(
            1,
            FdTarget::File(FileRef {
                path: "/run/dvs/node0/logs/dc0-1.log".into(),
                deleted: false,
                size: Some(5),
                allocated: None,
            }),
            false,
            true,
        ),
        fd(
            4,
            FdTarget::File(FileRef {
                path: "/data/db".into(),
                deleted: false,
                size: Some(10),
                allocated: None,
            }),
            true,
            true,
        ),
        fd(5, FdTarget::Device("/dev/pts/3".into()), true, true),
        fd(6, FdTarget::AnonInode("io_uring".into()), true, true),
        fd(7, FdTarget::AnonInode("eventfd".into()), true, true),
    ]);
    inv.procs[0].maps.push(FileRef {
        path: "/usr/bin/srv".into(),
        deleted: false,
        size: Some(99),
        allocated: None,
    });
    let n = needs(&inv, &src());
    assert_eq!(
        n.paths,
        vec![
            // Open for writing: asked by existence only.
            ("/data/db".into(), None),
            ("/dev/pts/3".into(), None),
            ("/usr/bin/srv".into(), Some(99))
        ]
    );
    let mut d = elsewhere();
    d.path_problems
        .push(("/data/db".into(), "does not exist".into()));
    let e = refused(judge(&inv, &src(), Some(&d)));
    assert!(e.contains("terminal /dev/pts/3"), "{e}");
    assert!(
        e.contains("anon_inode:[io_uring] (pid 10 (srv) fd 6), which criu cannot dump"),
        "{e}"
    );
    assert!(
        e.contains("/data/db (pid 10 (srv) fd 4), which does not exist on node1"),
        "{e}"
    );
    assert!(!e.contains("eventfd") && !e.contains("dc0-1.log"), "{e}");
}

#[test]
fn refusals_read_as_one_sentence() {
    let e = PreflightError::Refused(vec![
        Obstacle {
            resource: "A".into(),
            why: "x".into(),
        },
        Obstacle {
            resource: "B".into(),
            why: "y".into(),
        },
    ]);
    assert_eq!(e.to_string(), "it holds A, x; and B, y");
}
