//! Every M3-IPC call between endpoints on two hosts of the lab (network and mount namespaces
//! of their own, etcd over TLS as the directory): send/receive, sendrec/reply, notify,
//! vcopy both ways, getep, wait_for_bind, unbind, a timeout and an unknown endpoint.
//!
//! The test process is the application on both hosts: it connects to each node's
//! `ipc.sock`, which lies in the host's private `/run`, through the holder's
//! `/proc/PID/root` (a Unix socket, no network traffic from the root namespace). Node to node
//! traffic crosses the lab's network.

mod common;

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::lab::*;
use m3ipc::{Endpoint, Errno, Message, Source, Timeout, NOTIFY_MTYPE};

const CALL: Timeout = Timeout::Millis(20_000);

/// Node `n`'s IPC socket, reached through its host's holder.
fn ipc_socket(lab: &Lab, n: u16) -> PathBuf {
    let holder = host_of(lab, n)["holder"]
        .as_i64()
        .expect("the host's holder");
    PathBuf::from(format!("/proc/{holder}/root/run/dvs/node{n}/ipc.sock"))
}

fn msg(mtype: i32, word: u64) -> Message {
    let mut m = Message::new(mtype);
    m.set_word(0, word);
    m
}

#[test]
fn every_call_crosses_the_lab() {
    let lab = Lab::up(3);
    let (s1, s3) = (ipc_socket(&lab, 1), ipc_socket(&lab, 3));
    let mut a = Endpoint::bind_at(&s1, 0, 10).expect("bind dc0/10 on node1");
    let mut b = Endpoint::bind_at(&s3, 0, 11).expect("bind dc0/11 on node3");
    assert_eq!(b.getep().expect("getep"), (0, 11, 3));

    // send / receive (rendezvous), then sendrec / reply.
    let t = thread::spawn(move || {
        let m = b.receive_timeout(Source::Any, CALL).expect("receive");
        assert_eq!((m.source, m.mtype, m.word(0)), (10, 1, 7));
        let req = b
            .receive_timeout(Source::Ep(10), CALL)
            .expect("receive sendrec");
        b.reply(req.source, &msg(3, req.word(0) * 2))
            .expect("reply");
        b
    });
    a.send_timeout(11, &msg(1, 7), CALL)
        .expect("send across hosts");
    let r = a.sendrec_timeout(11, &msg(2, 21), CALL).expect("sendrec");
    assert_eq!((r.source, r.mtype, r.word(0)), (11, 3, 42));
    let mut b = t.join().expect("receiver");

    // notify: delivered to a receiver as a message of type NOTIFY_MTYPE.
    a.notify(11, 0x40).expect("notify");
    let n = b
        .receive_timeout(Source::Any, CALL)
        .expect("the notification");
    assert_eq!((n.mtype, n.source, n.word(0)), (NOTIFY_MTYPE, 10, 0x40));

    // vcopy both ways between the client's buffer (node1) and the server (node3).
    let mut buf = vec![0u8; 256 << 10];
    let addr = buf.as_mut_ptr() as u64;
    let t = thread::spawn(move || {
        let req = b.receive_timeout(Source::Any, CALL).expect("vcopy request");
        let pattern: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
        b.vcopy_to(req.source, req.word(0), &pattern)
            .expect("vcopy_to");
        let mut back = vec![0u8; pattern.len()];
        b.vcopy_from(req.source, req.word(0), &mut back)
            .expect("vcopy_from");
        assert_eq!(back, pattern, "vcopy_from read other bytes");
        b.reply(req.source, &msg(5, 0)).expect("reply");
        b
    });
    a.sendrec_timeout(11, &msg(4, addr), CALL)
        .expect("vcopy call");
    let b = t.join().expect("vcopy server");
    assert!(
        buf.iter().enumerate().all(|(i, x)| *x == (i % 251) as u8),
        "vcopy_to wrote other bytes"
    );

    // A timeout, an unknown endpoint, and wait_for_bind across hosts.
    let e = a.sendrec_timeout(11, &msg(6, 0), Timeout::Millis(200));
    assert_eq!(e.err().and_then(|e| e.errno()), Some(Errno::TimedOut));
    let e = a.send_timeout(99, &msg(6, 0), Timeout::Millis(200));
    assert!(e.is_err(), "a send to an endpoint bound nowhere succeeded");
    b.unbind().expect("unbind");
    let s3b = s3.clone();
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        Endpoint::bind_at(&s3b, 0, 12).expect("bind dc0/12 on node3")
    });
    a.wait_for_bind(12, CALL)
        .expect("wait_for_bind across hosts");
    let mut c = late.join().expect("late binder");
    let t = thread::spawn(move || {
        let m = c.receive_timeout(Source::Any, CALL).expect("receive");
        c.reply(m.source, &m).expect("reply");
    });
    let r = a
        .sendrec_timeout(12, &msg(8, 1), CALL)
        .expect("sendrec after wait_for_bind");
    assert_eq!(r.mtype, 8);
    t.join().expect("late server");
}
