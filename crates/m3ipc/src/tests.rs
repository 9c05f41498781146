//! Tests against a fake node kernel on the other end of a socket: it decodes the requests,
//! records them and answers canned responses.

use super::*;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::thread::{self, JoinHandle};

/// What the fake node kernel does with one request.
enum Act {
    /// Answer with this response.
    Resp(LocalResponse),
    /// Write these raw bytes.
    Raw(Vec<u8>),
    /// Write this response one byte at a time.
    Trickle(LocalResponse),
    /// Write these raw bytes, then close the connection.
    RawThenClose(Vec<u8>),
    /// Close the connection without answering.
    Close,
}

fn encoded(resp: &LocalResponse) -> Vec<u8> {
    frame::encode_to_vec(resp, &[], false).unwrap().to_vec()
}

/// Serves one connection; returns the requests it saw when the client hangs up.
fn serve<F>(mut sock: UnixStream, mut answer: F) -> Vec<LocalRequest>
where
    F: FnMut(&LocalRequest) -> Act,
{
    let mut dec = FrameDecoder::new();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((req, _)) = dec
            .next_frame::<LocalRequest>()
            .expect("client sent a bad frame")
        {
            let act = answer(&req);
            seen.push(req);
            // Write errors are ignored: the client may legitimately be gone.
            match act {
                Act::Resp(r) => drop(sock.write_all(&encoded(&r))),
                Act::Raw(v) => drop(sock.write_all(&v)),
                Act::Trickle(r) => {
                    for b in encoded(&r) {
                        let _ = sock.write_all(&[b]);
                        thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
                Act::RawThenClose(v) => {
                    let _ = sock.write_all(&v);
                    return seen;
                }
                Act::Close => return seen,
            }
        }
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => dec.extend(&buf[..n]),
        }
    }
}

/// A fake node kernel on a socketpair.
fn fake_node<F>(answer: F) -> (UnixStream, JoinHandle<Vec<LocalRequest>>)
where
    F: FnMut(&LocalRequest) -> Act + Send + 'static,
{
    let (client, server) = UnixStream::pair().unwrap();
    (client, thread::spawn(move || serve(server, answer)))
}

/// Answers bind with node 1 and everything else sensibly.
fn default_answer(req: &LocalRequest) -> Act {
    Act::Resp(match req {
        LocalRequest::Bind { dc, ep, .. } => LocalResponse::Ep {
            dc: *dc,
            ep: *ep,
            node: 1,
        },
        LocalRequest::GetEp => LocalResponse::Ep {
            dc: 3,
            ep: 7,
            node: 9,
        },
        LocalRequest::Receive { src, .. } => {
            let mut m = Message::new(42);
            m.source = match src {
                Source::Any => 11,
                Source::Ep(e) => *e,
            };
            LocalResponse::Msg(m)
        }
        LocalRequest::SendRec { dst, msg, .. } => {
            let mut m = *msg;
            m.source = *dst;
            m.mtype += 1;
            LocalResponse::Msg(m)
        }
        _ => LocalResponse::Done,
    })
}

/// Answers bind, then applies `then` to every later request.
fn after_bind(
    mut then: impl FnMut(&LocalRequest) -> Act + Send + 'static,
) -> impl FnMut(&LocalRequest) -> Act + Send {
    move |req| match req {
        LocalRequest::Bind { .. } => default_answer(req),
        _ => then(req),
    }
}

fn bound(
    answer: impl FnMut(&LocalRequest) -> Act + Send + 'static,
) -> (Endpoint, JoinHandle<Vec<LocalRequest>>) {
    let (sock, h) = fake_node(answer);
    (Endpoint::bind_stream(sock, 3, 7).unwrap(), h)
}

#[test]
fn bind_sends_version_and_caches_identity() {
    let (ep, h) = bound(default_answer);
    assert_eq!((ep.dc(), ep.ep(), ep.node()), (3, 7, 1));
    drop(ep);
    assert_eq!(
        h.join().unwrap(),
        vec![LocalRequest::Bind {
            version: PROTOCOL_VERSION,
            dc: 3,
            ep: 7
        }]
    );
}

#[test]
fn bind_refusal_maps_to_ipc_error() {
    let (sock, h) = fake_node(|_| Act::Resp(LocalResponse::Err(Errno::AlreadyBound)));
    let err = Endpoint::bind_stream(sock, 0, 5).unwrap_err();
    assert!(matches!(err, Error::Ipc(Errno::AlreadyBound)), "{err:?}");
    assert_eq!(err.errno(), Some(Errno::AlreadyBound));
    assert_eq!(err.to_string(), Errno::AlreadyBound.to_string());
    h.join().unwrap();
}

#[test]
fn bind_to_another_endpoint_is_a_protocol_error() {
    let (sock, h) = fake_node(|_| {
        Act::Resp(LocalResponse::Ep {
            dc: 0,
            ep: 6,
            node: 1,
        })
    });
    let err = Endpoint::bind_stream(sock, 0, 5).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    h.join().unwrap();
}

#[test]
fn every_call_sends_its_request() {
    let (mut ep, h) = bound(default_answer);
    let mut msg = Message::new(5);
    msg.set_word(0, 77);

    ep.send(4, &msg).unwrap();
    ep.send_timeout(4, &msg, Timeout::NoWait).unwrap();
    let r = ep.receive(Source::Any).unwrap();
    assert_eq!((r.source, r.mtype), (11, 42));
    let r = ep
        .receive_timeout(Source::Ep(8), Timeout::Millis(20))
        .unwrap();
    assert_eq!(r.source, 8);
    let r = ep.sendrec(4, &msg).unwrap();
    assert_eq!((r.source, r.mtype, r.word(0)), (4, 6, 77));
    ep.sendrec_timeout(4, &msg, Timeout::Millis(1000)).unwrap();
    ep.reply(12, &msg).unwrap();
    ep.notify(12, 0xfeed).unwrap();
    ep.vcopy(1, 0x1000, 2, 0x2000, 64).unwrap();
    ep.vcopy_timeout(1, 0x1000, 2, 0x2000, 64, Timeout::Millis(5))
        .unwrap();
    ep.wait_for_bind(4, Timeout::Millis(100)).unwrap();
    assert_eq!(ep.getep().unwrap(), (3, 7, 9));
    assert_eq!(ep.node(), 9, "getep refreshes the node after a migration");
    ep.unbind().unwrap();

    let seen = h.join().unwrap();
    let expected = vec![
        LocalRequest::Bind {
            version: PROTOCOL_VERSION,
            dc: 3,
            ep: 7,
        },
        LocalRequest::Send {
            dst: 4,
            msg,
            timeout: Timeout::Forever,
        },
        LocalRequest::Send {
            dst: 4,
            msg,
            timeout: Timeout::NoWait,
        },
        LocalRequest::Receive {
            src: Source::Any,
            timeout: Timeout::Forever,
        },
        LocalRequest::Receive {
            src: Source::Ep(8),
            timeout: Timeout::Millis(20),
        },
        LocalRequest::SendRec {
            dst: 4,
            msg,
            timeout: Timeout::Forever,
        },
        LocalRequest::SendRec {
            dst: 4,
            msg,
            timeout: Timeout::Millis(1000),
        },
        LocalRequest::Reply { dst: 12, msg },
        LocalRequest::Notify {
            dst: 12,
            value: 0xfeed,
        },
        LocalRequest::Vcopy {
            src: 1,
            src_addr: 0x1000,
            dst: 2,
            dst_addr: 0x2000,
            len: 64,
            timeout: Timeout::Forever,
        },
        LocalRequest::Vcopy {
            src: 1,
            src_addr: 0x1000,
            dst: 2,
            dst_addr: 0x2000,
            len: 64,
            timeout: Timeout::Millis(5),
        },
        LocalRequest::WaitForBind {
            ep: 4,
            timeout: Timeout::Millis(100),
        },
        LocalRequest::GetEp,
        LocalRequest::Unbind,
    ];
    assert_eq!(seen, expected);
}

#[test]
fn vcopy_conveniences_name_this_process_buffer() {
    let (mut ep, h) = bound(default_answer);
    let data = vec![1u8; 100];
    let mut buf = vec![0u8; 30];
    ep.vcopy_to(4, 0xabc, &data).unwrap();
    ep.vcopy_from(4, 0xdef, &mut buf).unwrap();
    let (data_addr, buf_addr) = (data.as_ptr() as u64, buf.as_ptr() as u64);
    drop(ep);
    let seen = h.join().unwrap();
    assert_eq!(
        seen[1..],
        [
            LocalRequest::Vcopy {
                src: 7,
                src_addr: data_addr,
                dst: 4,
                dst_addr: 0xabc,
                len: 100,
                timeout: Timeout::Forever
            },
            LocalRequest::Vcopy {
                src: 4,
                src_addr: 0xdef,
                dst: 7,
                dst_addr: buf_addr,
                len: 30,
                timeout: Timeout::Forever
            },
        ]
    );
}

#[test]
fn ipc_errors_map_and_leave_the_connection_usable() {
    let mut n = 0;
    let (mut ep, h) = bound(after_bind(move |req| {
        n += 1;
        if n == 1 {
            Act::Resp(LocalResponse::Err(Errno::TimedOut))
        } else {
            default_answer(req)
        }
    }));
    let err = ep
        .receive_timeout(Source::Any, Timeout::Millis(1))
        .unwrap_err();
    assert!(matches!(err, Error::Ipc(Errno::TimedOut)), "{err:?}");
    assert!(!err.is_connection_error());
    ep.send(4, &Message::new(1)).unwrap();
    drop(ep);
    h.join().unwrap();
}

#[test]
fn every_call_maps_err_responses() {
    let (mut ep, h) = bound(after_bind(|_| {
        Act::Resp(LocalResponse::Err(Errno::DstDied))
    }));
    let m = Message::new(1);
    let errs = [
        ep.send(4, &m).unwrap_err(),
        ep.receive(Source::Any).unwrap_err(),
        ep.sendrec(4, &m).unwrap_err(),
        ep.reply(4, &m).unwrap_err(),
        ep.notify(4, 1).unwrap_err(),
        ep.vcopy(1, 2, 3, 4, 5).unwrap_err(),
        ep.wait_for_bind(4, Timeout::NoWait).unwrap_err(),
        ep.getep().unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.errno(), Some(Errno::DstDied), "{e:?}");
    }
    ep.unbind().unwrap_err();
    h.join().unwrap();
}

#[test]
fn eof_mid_call_is_an_error_not_a_hang() {
    let (mut ep, h) = bound(after_bind(|_| Act::Close));
    let err = ep.receive(Source::Any).unwrap_err();
    match &err {
        Error::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("node kernel closed the connection"),
        "{err}"
    );
    assert!(err.is_connection_error());
    // Later calls fail at once instead of reading whatever comes next.
    assert!(ep
        .send(1, &Message::new(0))
        .unwrap_err()
        .is_connection_error());
    h.join().unwrap();
}

#[test]
fn eof_in_the_middle_of_a_frame_is_an_error() {
    let (mut ep, h) = bound(after_bind(|_| {
        let mut v = encoded(&LocalResponse::Msg(Message::new(1)));
        v.truncate(10);
        Act::RawThenClose(v)
    }));
    let err = ep.receive(Source::Any).unwrap_err();
    assert!(err.is_connection_error());
    assert!(
        err.to_string().contains("in the middle of a response"),
        "{err}"
    );
    h.join().unwrap();
}

#[test]
fn garbage_frame_is_a_protocol_error() {
    // A well-formed frame header whose body is not a LocalResponse.
    let garbage = vec![6, 0, 0, 0, 0, 1, 0, 0, 0, 0xff];
    let (mut ep, h) = bound(after_bind(move |_| Act::Raw(garbage.clone())));
    let err = ep.sendrec(4, &Message::new(1)).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    drop(ep);
    h.join().unwrap();

    // An absurd length prefix is refused without waiting for the announced bytes.
    let (mut ep, h) = bound(after_bind(|_| Act::Raw(u32::MAX.to_le_bytes().to_vec())));
    let err = ep.receive(Source::Any).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    drop(ep);
    h.join().unwrap();
}

#[test]
fn wrong_response_kind_is_a_protocol_error() {
    let (mut ep, h) = bound(after_bind(|req| match req {
        LocalRequest::Send { .. } => Act::Resp(LocalResponse::Msg(Message::new(1))),
        _ => Act::Resp(LocalResponse::Done),
    }));
    let err = ep.send(4, &Message::new(1)).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    drop(ep);
    h.join().unwrap();

    let (mut ep, h) = bound(after_bind(|_| Act::Resp(LocalResponse::Done)));
    assert!(matches!(ep.receive(Source::Any), Err(Error::Protocol(_))));
    drop(ep);
    h.join().unwrap();
}

#[test]
fn extra_response_is_a_protocol_error() {
    let (mut ep, h) = bound(after_bind(|_| {
        let mut v = encoded(&LocalResponse::Done);
        v.extend(encoded(&LocalResponse::Done));
        Act::Raw(v)
    }));
    let err = ep.notify(4, 1).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    drop(ep);
    h.join().unwrap();
}

#[test]
fn responses_arriving_byte_by_byte_are_reassembled() {
    let (mut ep, h) = bound(after_bind(|req| match default_answer(req) {
        Act::Resp(r) => Act::Trickle(r),
        other => other,
    }));
    let mut m = Message::new(9);
    m.set_word(6, u64::MAX);
    let r = ep.sendrec(4, &m).unwrap();
    assert_eq!((r.mtype, r.word(6)), (10, u64::MAX));
    ep.notify(4, 1).unwrap();
    drop(ep);
    h.join().unwrap();
}

#[test]
fn bind_at_connects_to_a_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || serve(listener.accept().unwrap().0, default_answer));
    let mut ep = Endpoint::bind_at(&path, 3, 7).unwrap();
    ep.send(1, &Message::new(1)).unwrap();
    drop(ep);
    assert_eq!(h.join().unwrap().len(), 2);
}

#[test]
fn bind_at_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such.sock");
    let err = Endpoint::bind_at(&path, 0, 1).unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// All environment checks in one test: tests run in parallel threads sharing the environment.
#[test]
fn environment_binding() {
    std::env::remove_var(ENV_SOCKET);
    std::env::remove_var(ENV_DC);
    std::env::remove_var(ENV_EP);
    let err = Endpoint::from_env().unwrap_err();
    assert!(
        matches!(&err, Error::Env(m) if m.contains(ENV_SOCKET)),
        "{err:?}"
    );
    let err = Endpoint::bind(0, 1).unwrap_err();
    assert!(
        matches!(&err, Error::Env(m) if m.contains(ENV_SOCKET)),
        "{err:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::env::set_var(ENV_SOCKET, &path);
    let err = Endpoint::from_env().unwrap_err();
    assert!(
        matches!(&err, Error::Env(m) if m.contains(ENV_DC)),
        "{err:?}"
    );
    std::env::set_var(ENV_DC, "x");
    let err = Endpoint::from_env().unwrap_err();
    assert!(
        matches!(&err, Error::Env(m) if m.contains(ENV_DC) && m.contains("\"x\"")),
        "{err:?}"
    );
    std::env::set_var(ENV_DC, "3");
    let err = Endpoint::from_env().unwrap_err();
    assert!(
        matches!(&err, Error::Env(m) if m.contains(ENV_EP)),
        "{err:?}"
    );
    std::env::set_var(ENV_EP, "7");

    let h = thread::spawn(move || {
        let a = serve(listener.accept().unwrap().0, default_answer);
        let b = serve(listener.accept().unwrap().0, default_answer);
        (a, b)
    });
    let ep = Endpoint::from_env().unwrap();
    assert_eq!((ep.dc(), ep.ep()), (3, 7));
    drop(ep);
    let ep = Endpoint::bind(3, 8).unwrap();
    assert_eq!(ep.ep(), 8);
    drop(ep);
    let (a, b) = h.join().unwrap();
    assert_eq!(
        a,
        vec![LocalRequest::Bind {
            version: PROTOCOL_VERSION,
            dc: 3,
            ep: 7
        }]
    );
    assert_eq!(
        b,
        vec![LocalRequest::Bind {
            version: PROTOCOL_VERSION,
            dc: 3,
            ep: 8
        }]
    );
    std::env::remove_var(ENV_SOCKET);
    std::env::remove_var(ENV_DC);
    std::env::remove_var(ENV_EP);
}
