//! Hostile input on a node kernel's sockets: garbage, truncated and oversized frames and
//! protocol abuse on the local Unix socket, and bad handshakes and garbage on the peer port.
//! The node must close the offending connection, log why, and keep serving everyone else.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::attack::*;
use common::{errno, pseudo_random, Cluster};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::peer::PeerFrame;
use dvs_wire::peer::{Hello, IpcFrame, LinkFrame, Notify, Refuse, Welcome};
use dvs_wire::{frame, FrameDecoder, MAX_FRAME, PROTOCOL_VERSION};
use m3ipc::{Errno, NodeId, Timeout};

#[test]
fn local_socket_refuses_malformed_frames() {
    let c = Cluster::start();
    let node = 1;
    let sock = c.node(node).ipc_socket();
    let mut witness = Witness::new(&c, node, node, 1);
    witness.check("before");

    let random = pseudo_random(1, 4096);
    let announced = u32::from_le_bytes(random[..4].try_into().unwrap()) as usize;
    assert!(
        announced > MAX_FRAME + 1,
        "the seed must give a hostile length"
    );
    let mut at_limit = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    at_limit.push(0);
    at_limit.extend_from_slice(&((MAX_FRAME - 4) as u32).to_le_bytes());
    at_limit.extend_from_slice(&pseudo_random(2, MAX_FRAME - 4));
    at_limit[9] = 0xff; // not a valid variant tag

    // (what, bytes, half-close after writing, what the log line must say)
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("random bytes", random, false, "exceeds the limit"),
        (
            "huge length",
            vec![0xf0, 0xff, 0xff, 0xff, 0],
            false,
            "exceeds the limit",
        ),
        ("zero length", vec![0, 0, 0, 0], false, "no flags byte"),
        (
            "no body length",
            raw_frame(0, &[1, 2]),
            false,
            "no body length",
        ),
        (
            "body longer than the frame",
            raw_frame(0, &[50, 0, 0, 0, 1]),
            false,
            "body shorter than announced",
        ),
        (
            "unknown flags",
            raw_frame(0x80, &[0, 0, 0, 0]),
            false,
            "unknown frame flags",
        ),
        (
            "garbage body",
            frame_with_body(&[0xff, 0xff, 0xff, 0x0f]),
            false,
            "undecodable frame body",
        ),
        (
            "bad lz4 payload",
            raw_frame(1, &[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            false,
            "bad lz4 payload",
        ),
        (
            "frame of the largest size with a garbage body",
            at_limit,
            false,
            "undecodable frame body",
        ),
        (
            "truncated frame, then end of stream",
            vec![100, 0, 0, 0, 0, 1, 2],
            true,
            "in the middle of a frame",
        ),
    ];
    for (what, bytes, half_close, reason) in &cases {
        let before = c.log_count(node, reason);
        let conn = UnixStream::connect(&sock).unwrap();
        let answer = send_and_expect_close(conn, bytes, *half_close, what);
        assert!(answer.is_empty(), "{what}: the node answered {answer:?}");
        let line = c.wait_log(node, reason, before);
        assert!(line.contains("local process"), "{what}: log line {line:?}");
        witness.check(what);
    }
}

#[test]
fn local_socket_protocol_abuse() {
    let c = Cluster::start();
    let node = 0;
    let sock = c.node(node).ipc_socket();
    let mut witness = Witness::new(&c, node, 2, 1);

    // Calls before binding fail with NotBound; the connection stays usable.
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_timeout();
    let mut dec = FrameDecoder::new();
    let mut ask = |conn: &mut UnixStream, req: &LocalRequest| -> LocalResponse {
        conn.write_all(&encode(req)).unwrap();
        let mut buf = [0u8; 512];
        loop {
            if let Some((r, _)) = dec.next_frame::<LocalResponse>().unwrap() {
                return r;
            }
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "the node closed the connection");
            dec.extend(&buf[..n]);
        }
    };
    for req in [
        LocalRequest::Receive {
            src: Source::Any,
            timeout: Timeout::NoWait,
        },
        LocalRequest::GetEp,
        LocalRequest::Unbind,
        LocalRequest::Notify { dst: 1, value: 1 },
    ] {
        assert_eq!(
            ask(&mut conn, &req),
            LocalResponse::Err(Errno::NotBound),
            "{req:?}"
        );
    }
    // A bind with another protocol version is refused.
    let bind = |version| LocalRequest::Bind {
        version,
        dc: 0,
        ep: 50,
    };
    assert_eq!(
        ask(&mut conn, &bind(PROTOCOL_VERSION + 1)),
        LocalResponse::Err(Errno::Invalid)
    );
    // Then a proper bind on the same connection works, and a second one is refused.
    assert_eq!(
        ask(&mut conn, &bind(PROTOCOL_VERSION)),
        LocalResponse::Ep {
            dc: 0,
            ep: 50,
            node
        }
    );
    assert_eq!(
        ask(&mut conn, &bind(PROTOCOL_VERSION)),
        LocalResponse::Err(Errno::ConnAlreadyBound)
    );

    // A request while the previous one is still blocked breaks the protocol: closed.
    let reason = "request while a previous call is still in progress";
    let before = c.log_count(node, reason);
    let mut two = encode(&LocalRequest::Receive {
        src: Source::Any,
        timeout: Timeout::Forever,
    });
    two.extend(encode(&LocalRequest::GetEp));
    let answer = send_and_expect_close(conn, &two, false, "pipelined requests");
    assert!(
        answer.is_empty(),
        "pipelined requests: the node answered {answer:?}"
    );
    c.wait_log(node, reason, before);
    witness.check("after pipelined requests");
    // Its endpoint was released with the connection.
    common::eventually("endpoint 50 to be free again", || {
        c.try_bind(node, 0, 50).ok()
    });

    // A valid request frame carrying an unexpected tail is still one request.
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_timeout();
    let req = LocalRequest::Bind {
        version: PROTOCOL_VERSION,
        dc: 0,
        ep: 51,
    };
    conn.write_all(&frame::encode_to_vec(&req, b"tail", false).unwrap())
        .unwrap();
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).unwrap();
    assert_eq!(
        frames::<LocalResponse>(&buf[..n]),
        vec![LocalResponse::Ep {
            dc: 0,
            ep: 51,
            node
        }]
    );
    witness.check("at the end");
}

/// A Hello frame.
fn hello(version: u32, cluster: &str, node: NodeId) -> Vec<u8> {
    encode(&PeerFrame::Link(LinkFrame::Hello(Hello {
        version,
        cluster: cluster.into(),
        node,
    })))
}

/// A bad handshake and how the node must react.
struct Handshake<'a> {
    what: &'a str,
    /// What the dialer sends.
    bytes: Vec<u8>,
    /// Whether it then half-closes the connection.
    half_close: bool,
    /// Whether the node answers with `Refuse` (else it closes without a frame).
    refused: bool,
    /// What the node's log line must say.
    log: &'a str,
}

/// Sends each bad handshake over a connection `connect` makes; checks that the node refuses
/// with a `Refuse` that tells nothing (or closes), logs the real reason, and keeps its links.
fn refuse_each(c: &Cluster, target: NodeId, cases: &[Handshake], connect: impl Fn() -> PeerConn) {
    for Handshake {
        what,
        bytes,
        half_close,
        refused,
        log,
    } in cases
    {
        let before = c.log_count(target, log);
        let answer = send_and_expect_close(connect(), bytes, *half_close, what);
        let got = frames::<PeerFrame>(&answer);
        if *refused {
            assert_eq!(
                got,
                vec![PeerFrame::Link(LinkFrame::Refuse(Refuse {
                    reason: "link refused".into()
                }))],
                "{what}"
            );
        } else {
            assert!(got.is_empty(), "{what}: expected no answer, got {got:?}");
        }
        // The refusal leaks nothing about the cluster.
        let cluster = c.cfg.cluster_id.as_bytes();
        assert!(
            !answer.windows(cluster.len()).any(|w| w == cluster),
            "{what}: the answer names the cluster id"
        );
        let line = c.wait_log(target, log, before);
        assert!(line.contains("peer link from"), "{what}: log line {line:?}");
    }
}

/// Bad `Hello`s over a link that passed (or, in plaintext, skipped) TLS.
fn bad_hellos<'a>(cluster: &str, target: NodeId, claimed: NodeId) -> Vec<Handshake<'a>> {
    let mut garbage = pseudo_random(3, 2048);
    garbage[3] = 0xff; // a length far above the limit
    let mut partial = hello(PROTOCOL_VERSION, cluster, claimed);
    partial.truncate(partial.len() - 3);
    // A frame header announcing 1 MiB: more than a peer may send before its handshake.
    let mut big = (1u32 << 20).to_le_bytes().to_vec();
    big.extend_from_slice(&pseudo_random(4, 1024));
    vec![
        Handshake {
            what: "garbage before Hello",
            bytes: garbage,
            half_close: false,
            refused: true,
            log: "malformed handshake frame",
        },
        Handshake {
            what: "a large frame before the handshake",
            bytes: big,
            half_close: false,
            refused: true,
            log: "exceeds the limit",
        },
        Handshake {
            what: "wrong cluster id",
            bytes: hello(PROTOCOL_VERSION, "another-cluster", claimed),
            half_close: false,
            refused: true,
            log: "another cluster",
        },
        Handshake {
            what: "wrong protocol version",
            bytes: hello(PROTOCOL_VERSION + 7, cluster, claimed),
            half_close: false,
            refused: true,
            log: "protocol version mismatch",
        },
        Handshake {
            what: "the node's own id",
            bytes: hello(PROTOCOL_VERSION, cluster, target),
            half_close: false,
            refused: true,
            log: "node id",
        },
        Handshake {
            what: "another frame first",
            bytes: encode(&PeerFrame::Link(LinkFrame::Ping)),
            half_close: false,
            refused: true,
            log: "expected Hello",
        },
        Handshake {
            what: "truncated Hello, then end of stream",
            bytes: partial,
            half_close: true,
            refused: true,
            log: "connection closed during the handshake",
        },
    ]
}

#[test]
fn peer_port_refuses_peers_without_a_valid_certificate() {
    let c = Cluster::start();
    let target = 1;
    let addr = c.node(target).peer_addr;
    let cluster = c.cfg.cluster_id.clone();
    let mut witness = Witness::new(&c, 0, target, 1);
    witness.check("before");

    // No TLS at all, even with the right cluster id: the TLS layer refuses it.
    let plain = [Handshake {
        what: "plaintext Hello with the right cluster id",
        bytes: hello(PROTOCOL_VERSION, &cluster, 0),
        half_close: false,
        refused: false,
        log: "TLS handshake failed",
    }];
    refuse_each(&c, target, &plain, || PeerConn::plain(addr));

    // TLS without a client certificate, and with a certificate of another CA that names a
    // real node of this cluster.
    let (_keep, forged) = forged_identity(&c, 0);
    for (what, conn) in [
        (
            "no client certificate",
            Box::new(|| PeerConn::tls_anonymous(addr)) as Box<dyn Fn() -> PeerConn>,
        ),
        (
            "certificate of another CA",
            Box::new(|| PeerConn::tls(addr, &forged)),
        ),
    ] {
        let before = c.log_count(target, "TLS handshake failed");
        let mut conn = conn();
        conn.set_timeout();
        let _ = conn.write_all(&hello(PROTOCOL_VERSION, &cluster, 0));
        let mut buf = [0u8; 64];
        let r = conn.read(&mut buf);
        assert!(
            !matches!(r, Ok(n) if n > 0),
            "{what}: the node answered {r:?}"
        );
        c.wait_log(target, "TLS handshake failed", before);
    }

    // A valid certificate of node 0 whose Hello claims node 2.
    let stolen = stolen_identity(&c, 0);
    let claims_other = [Handshake {
        what: "Hello claiming another node than the certificate",
        bytes: hello(PROTOCOL_VERSION, &cluster, 2),
        half_close: false,
        refused: true,
        log: "its certificate names node 0",
    }];
    refuse_each(&c, target, &claims_other, || PeerConn::tls(addr, &stolen));
    // Bad Hellos after a valid TLS handshake.
    refuse_each(&c, target, &bad_hellos(&cluster, target, 0), || {
        PeerConn::tls(addr, &stolen)
    });

    // The real links were never disturbed.
    assert!(Cluster::all_links_up(&c.status()));
    witness.check("after");
}

#[test]
fn plaintext_cluster_refuses_bad_handshakes_without_leaking() {
    let c = Cluster::start_with(|cfg| cfg.link.tls = false);
    let target = 1;
    let addr = c.node(target).peer_addr;
    assert!(
        c.log(target).contains("NOT encrypted"),
        "no warning at start"
    );
    let mut witness = Witness::new(&c, 0, target, 1);
    witness.check("before");
    let mut cases = bad_hellos(&c.cfg.cluster_id, target, 0);
    cases.push(Handshake {
        what: "unknown node id",
        bytes: hello(PROTOCOL_VERSION, &c.cfg.cluster_id, 99),
        half_close: false,
        refused: true,
        log: "node id 99 is not a peer",
    });
    refuse_each(&c, target, &cases, || PeerConn::plain(addr));
    assert!(Cluster::all_links_up(&c.status()));
    witness.check("after");
}

/// A fake peer that completes the handshake and then sends garbage.
struct Attack {
    what: &'static str,
    /// The node whose peer port is dialed.
    target: NodeId,
    /// The node id the Hello claims (a real peer of the target, whose key it stole).
    claimed: NodeId,
    /// Garbage sent in the same write as the Hello.
    with_hello: Vec<u8>,
    /// Garbage sent once the Welcome arrived (if not empty).
    after_welcome: Vec<u8>,
}

#[test]
fn garbage_after_a_handshake_drops_the_link_and_the_cluster_recovers() {
    let c = Cluster::start();
    let cluster = c.cfg.cluster_id.clone();
    let cases = [
        Attack {
            what: "garbage right behind the Hello",
            target: 2,
            claimed: 0,
            with_hello: vec![0xff, 0xff, 0xff, 0xff, 0, 1, 2],
            after_welcome: vec![],
        },
        Attack {
            what: "garbage body after Welcome",
            target: 1,
            claimed: 0,
            with_hello: vec![],
            after_welcome: frame_with_body(&[0xff, 0xff, 0xff, 0x0f]),
        },
        Attack {
            what: "claiming a node that never dials",
            target: 0,
            claimed: 2,
            with_hello: vec![],
            after_welcome: pseudo_random(5, 64),
        },
    ];
    for (i, attack) in cases.iter().enumerate() {
        let Attack {
            what,
            target,
            claimed,
            ref with_hello,
            after_welcome: ref after,
        } = *attack;
        let redials = c.log_count(claimed, &format!("link to node {target} up"));
        let reason = format!("malformed frame from node {claimed}");
        let logged = c.log_count(target, &reason);
        let replaced = c.log_count(target, "closing the old one");

        let stolen = stolen_identity(&c, claimed);
        let mut conn = PeerConn::tls(c.node(target).peer_addr, &stolen);
        conn.set_timeout();
        let mut first = hello(PROTOCOL_VERSION, &cluster, claimed);
        first.extend_from_slice(with_hello);
        conn.write_all(&first).unwrap();
        if after.is_empty() {
            let answer = send_and_expect_close(conn, &[], false, what);
            // Before closing it, the node may have welcomed the link and told it what runs
            // there.
            let got = frames::<PeerFrame>(&answer);
            assert!(
                got.is_empty()
                    || got[0] == PeerFrame::Link(LinkFrame::Welcome(Welcome { node: target })),
                "{what}: {got:?}"
            );
        } else {
            let welcome = read_until::<PeerFrame>(&mut conn, what, |_| true);
            assert_eq!(
                welcome,
                PeerFrame::Link(LinkFrame::Welcome(Welcome { node: target })),
                "{what}"
            );
            send_and_expect_close(conn, after, false, what);
        }
        let line = c.wait_log(target, &reason, logged);
        assert!(line.contains("down"), "{what}: log line {line:?}");
        // The authenticated newcomer replaced the real link only after closing it, and said so.
        if claimed < target {
            c.wait_log(target, "closing the old one", replaced);
        }

        // The real link of the claimed node comes back by itself.
        c.wait_log(claimed, &format!("link to node {target} up"), redials);
        c.wait_all_links_up();
        let base = 10 * (i as m3ipc::Ep + 1);
        Witness::new(&c, claimed, target, base).check(what);
        Witness::new(&c, target, claimed, base + 2).check(what);
    }
}

#[test]
fn nothing_is_delivered_from_a_refused_peer() {
    // A Hello followed by a Notify for a bound endpoint, from peers that fail the handshake:
    // without TLS, and with a certificate of another CA. The node must act on nothing.
    let c = Cluster::start();
    let mut victim = c.bind(1, 5);
    let mut bytes = hello(PROTOCOL_VERSION, &c.cfg.cluster_id, 0);
    bytes.extend(encode(&PeerFrame::Ipc(IpcFrame::Notify(Notify {
        dc: 0,
        src: 6,
        dst: 5,
        value: 1,
    }))));
    let addr = c.node(1).peer_addr;
    send_and_expect_close(PeerConn::plain(addr), &bytes, false, "plaintext peer");
    let (_keep, forged) = forged_identity(&c, 0);
    let mut conn = PeerConn::tls(addr, &forged);
    conn.set_timeout();
    let _ = conn.write_all(&bytes);
    let _ = conn.read(&mut [0u8; 16]);
    let e = errno(victim.receive_timeout(Source::Any, Timeout::Millis(100)));
    assert_eq!(e, Errno::TimedOut);
}
