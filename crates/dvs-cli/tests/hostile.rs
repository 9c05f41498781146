//! Hostile input on a node kernel's sockets: garbage, truncated and oversized frames and
//! protocol abuse on the local Unix socket, and bad handshakes and garbage on the peer port.
//! The node must close the offending connection, log why, and keep serving everyone else.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;

use common::{errno, pseudo_random, Cluster, CALL_TIMEOUT, PATIENCE};
use dvs_wire::frame;
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::peer::PeerFrame;
use dvs_wire::{FrameDecoder, MAX_FRAME, PROTOCOL_VERSION};
use m3ipc::{Endpoint, Errno, Message, NodeId, Timeout};

/// Something that can be written to and read from with a timeout (a Unix or TCP socket).
trait Conn: Read + Write {
    /// Makes reads fail after [`PATIENCE`] instead of hanging.
    fn set_timeout(&self);
    /// Half-closes: the node reads end of stream, the socket can still be read.
    fn shutdown_write(&self);
}

impl Conn for UnixStream {
    fn set_timeout(&self) {
        self.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Conn for TcpStream {
    fn set_timeout(&self) {
        self.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Writes `bytes` (the node may close the connection before taking them all, so write errors
/// are fine), optionally half-closes, then reads until the node closes the connection.
/// Returns what the node sent. Fails the test if the node keeps the connection open.
fn send_and_expect_close<C: Conn>(
    mut conn: C,
    bytes: &[u8],
    half_close: bool,
    what: &str,
) -> Vec<u8> {
    conn.set_timeout();
    let _ = conn.write_all(bytes);
    if half_close {
        conn.shutdown_write();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A close with our bytes still unread may reset the connection.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the node kept the connection open")
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// Every frame of type `T` in `bytes`.
fn frames<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
    let mut dec = FrameDecoder::new();
    dec.extend(bytes);
    let mut out = Vec::new();
    while let Ok(Some((f, _))) = dec.next_frame::<T>() {
        out.push(f);
    }
    out
}

/// A frame with the given flags and payload (body length field included by the caller).
fn raw_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    v.push(flags);
    v.extend_from_slice(payload);
    v
}

/// A frame whose body is `body` verbatim (not necessarily a valid encoding).
fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut payload = (body.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(body);
    raw_frame(0, &payload)
}

/// One valid frame holding `v`.
fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    frame::encode_to_vec(v, &[], false).unwrap().to_vec()
}

/// A client/server pair on `node` that answers a sendrec, proving the node still serves.
struct Witness {
    client: Endpoint,
    server: Option<thread::JoinHandle<Endpoint>>,
    server_ep: m3ipc::Ep,
}

impl Witness {
    fn new(c: &Cluster, client_node: NodeId, server_node: NodeId, base: m3ipc::Ep) -> Witness {
        let mut w = Witness {
            client: c.bind(client_node, base),
            server: None,
            server_ep: base + 1,
        };
        let server = c.bind(server_node, base + 1);
        w.server = Some(Self::serve(server));
        w
    }

    fn serve(mut server: Endpoint) -> thread::JoinHandle<Endpoint> {
        // Errors are left to `check` to notice: the last round ends with the cluster.
        thread::spawn(move || {
            if let Ok(req) = server.receive_timeout(Source::Any, CALL_TIMEOUT) {
                let _ = server.reply(req.source, &Message::new(req.mtype + 1));
            }
            server
        })
    }

    /// One sendrec round trip; fails the test if it does not work.
    fn check(&mut self, what: &str) {
        let r = self
            .client
            .sendrec_timeout(self.server_ep, &Message::new(0x10), CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: the normal client stopped working: {e}"));
        assert_eq!(r.mtype, 0x11, "{what}");
        let server = self.server.take().unwrap().join().unwrap();
        self.server = Some(Self::serve(server));
    }
}

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
    encode(&PeerFrame::Hello {
        version,
        cluster: cluster.into(),
        node,
    })
}

/// A bad handshake and how the node must react.
struct Handshake<'a> {
    what: &'a str,
    /// What the dialer sends.
    bytes: Vec<u8>,
    /// Whether it then half-closes the connection.
    half_close: bool,
    /// What the `Refuse` frame must say (`None`: the node closes without one).
    refusal: Option<&'a str>,
    /// What the node's log line must say.
    log: &'a str,
}

#[test]
fn peer_port_refuses_bad_handshakes() {
    let c = Cluster::start();
    let target = 1;
    let addr = c.node(target).peer_addr;
    let cluster = c.cfg.cluster_id.clone();
    let mut witness = Witness::new(&c, 0, target, 1);
    witness.check("before");

    let mut garbage = pseudo_random(3, 2048);
    garbage[3] = 0xff; // a length far above the limit
    let mut partial = hello(PROTOCOL_VERSION, &cluster, 0);
    partial.truncate(partial.len() - 3);

    let cases = [
        Handshake {
            what: "garbage before Hello",
            bytes: garbage,
            half_close: false,
            refusal: None,
            log: "malformed handshake frame",
        },
        Handshake {
            what: "wrong cluster id",
            bytes: hello(PROTOCOL_VERSION, "another-cluster", 0),
            half_close: false,
            refusal: Some("cluster id mismatch"),
            log: "cluster id mismatch",
        },
        Handshake {
            what: "wrong protocol version",
            bytes: hello(PROTOCOL_VERSION + 7, &cluster, 0),
            half_close: false,
            refusal: Some("protocol version mismatch"),
            log: "protocol version mismatch",
        },
        Handshake {
            what: "unknown node id",
            bytes: hello(PROTOCOL_VERSION, &cluster, 99),
            half_close: false,
            refusal: Some("not a peer"),
            log: "node id 99 is not a peer",
        },
        Handshake {
            what: "the node's own id",
            bytes: hello(PROTOCOL_VERSION, &cluster, target),
            half_close: false,
            refusal: Some("not a peer"),
            log: "is not a peer",
        },
        Handshake {
            what: "another frame first",
            bytes: encode(&PeerFrame::Ping),
            half_close: false,
            refusal: Some("expected Hello"),
            log: "expected Hello",
        },
        Handshake {
            what: "truncated Hello, then end of stream",
            bytes: partial,
            half_close: true,
            refusal: None,
            log: "connection closed during the handshake",
        },
    ];
    for Handshake {
        what,
        bytes,
        half_close,
        refusal,
        log,
    } in &cases
    {
        let before = c.log_count(target, log);
        let conn = TcpStream::connect(addr).unwrap();
        let answer = send_and_expect_close(conn, bytes, *half_close, what);
        let got = frames::<PeerFrame>(&answer);
        match refusal {
            Some(reason) => assert!(
                matches!(got.as_slice(), [PeerFrame::Refuse { reason: r }] if r.contains(reason)),
                "{what}: expected a Refuse naming {reason:?}, got {got:?}"
            ),
            None => assert!(got.is_empty(), "{what}: expected no answer, got {got:?}"),
        }
        let line = c.wait_log(target, log, before);
        assert!(line.contains("peer link from"), "{what}: log line {line:?}");
    }
    // The real links were never disturbed.
    assert!(Cluster::all_links_up(&c.status()));
    witness.check("after");
}

/// A fake peer that completes the handshake and then sends garbage.
struct Attack {
    what: &'static str,
    /// The node whose peer port is dialed.
    target: NodeId,
    /// The node id the Hello claims (a real peer of the target).
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

        let mut conn = TcpStream::connect(c.node(target).peer_addr).unwrap();
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
                got.is_empty() || got[0] == PeerFrame::Welcome { node: target },
                "{what}: {got:?}"
            );
        } else {
            // Wait for the Welcome before sending the garbage.
            let mut dec = FrameDecoder::new();
            let mut buf = [0u8; 512];
            let welcome = loop {
                if let Some((f, _)) = dec.next_frame::<PeerFrame>().unwrap() {
                    break f;
                }
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "{what}: closed before the Welcome");
                dec.extend(&buf[..n]);
            };
            assert_eq!(welcome, PeerFrame::Welcome { node: target }, "{what}");
            send_and_expect_close(conn, after, false, what);
        }
        let line = c.wait_log(target, &reason, logged);
        assert!(line.contains("down"), "{what}: log line {line:?}");

        // The real link of the claimed node was replaced by ours, then ours was dropped: the
        // real one comes back by itself.
        c.wait_log(claimed, &format!("link to node {target} up"), redials);
        c.wait_all_links_up();
        let base = 10 * (i as m3ipc::Ep + 1);
        Witness::new(&c, claimed, target, base).check(what);
        Witness::new(&c, target, claimed, base + 2).check(what);
    }
}

#[test]
fn nothing_is_delivered_from_a_refused_peer() {
    // A Hello with the wrong cluster id followed by a Deliver for a bound endpoint: the node
    // must not act on anything after a refused handshake.
    let c = Cluster::start();
    let mut victim = c.bind(1, 5);
    let mut bytes = hello(PROTOCOL_VERSION, "another-cluster", 0);
    bytes.extend(encode(&PeerFrame::Notify {
        dc: 0,
        src: 6,
        dst: 5,
        value: 1,
    }));
    let conn = TcpStream::connect(c.node(1).peer_addr).unwrap();
    send_and_expect_close(conn, &bytes, false, "refused peer");
    let e = errno(victim.receive_timeout(Source::Any, Timeout::Millis(100)));
    assert_eq!(e, Errno::TimedOut);
}
