//! Every error a node kernel can answer reaches a C caller as its own `EDVS*` code: a fake
//! node kernel on a Unix socket accepts the bind of the C entry point `dvs_bind_at`, then
//! answers each `dvk_send_T`, `dvk_sendrec_T` and `dvk_receive_T` with one [`Errno`] after
//! another. This covers the codes a real node kernel never or only rarely produces through
//! the C API (EDVSSHUTDOWN: the node kernel closes its endpoints' connections instead, which
//! is EDVSIO; EDVSAGAIN, EDVSNOSPC, EDVSOTHERDC, which `dvs-cli/tests/clib.rs` also provokes
//! on real clusters), and any [`Errno`] added later (the list is checked against the codes).

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::thread;

use dvs_wire::frame::{self, FrameDecoder};
use dvs_wire::local::{LocalRequest, LocalResponse};
use dvs_wire::{Errno, Message};
use m3ipc_c::codes::{errno_code, lookup, CODES};
use m3ipc_c::{dvk_receive_T, dvk_send_T, dvk_sendrec_T, dvk_unbind, dvs_bind_at, CMessage, ANY};

/// Every IPC error, in the order the fake node kernel answers them.
const ALL: [Errno; 23] = Errno::ALL;

/// The three calls each error is answered to.
const CALLS: usize = 3;

/// Serves one connection: answers the bind, then `errors` in order (one per request), and
/// returns how many it answered once the client unbinds or hangs up.
fn fake_node(listener: UnixListener, errors: Vec<Errno>) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let mut dec = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        let mut next = errors.into_iter();
        let mut answered = 0;
        loop {
            while let Some((req, _)) = dec
                .next_frame::<LocalRequest>()
                .expect("a well-formed request")
            {
                let unbind = matches!(req, LocalRequest::Unbind);
                let resp = match req {
                    LocalRequest::Bind { dc, ep, .. } => LocalResponse::Ep { dc, ep, node: 0 },
                    LocalRequest::Unbind => LocalResponse::Done,
                    _ => match next.next() {
                        Some(e) => {
                            answered += 1;
                            LocalResponse::Err(e)
                        }
                        None => LocalResponse::Done,
                    },
                };
                let bytes = frame::encode_to_vec(&resp, &[], false).expect("encode");
                sock.write_all(&bytes).expect("answer");
                if unbind {
                    return answered;
                }
            }
            match sock.read(&mut buf) {
                Ok(0) | Err(_) => return answered,
                Ok(n) => dec.extend(&buf[..n]),
            }
        }
    })
}

#[test]
fn every_errno_reaches_c_as_its_code() {
    // The list is complete: every Errno is one of the codes, and every code is an Errno or
    // one of the library's own (EDVSGENERIC, EDVSIO).
    let mut named: Vec<&str> = ALL
        .iter()
        .map(|e| lookup(errno_code(*e)).unwrap().name)
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(named.len(), ALL.len());
    assert_eq!(
        CODES.iter().filter(|c| c.errno.is_some()).count(),
        ALL.len()
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ipc.sock");
    let listener = UnixListener::bind(&path).expect("listen");
    let errors: Vec<Errno> = ALL.iter().flat_map(|e| [*e; CALLS]).collect();
    let node = fake_node(listener, errors);

    let sock = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { dvs_bind_at(sock.as_ptr(), 0, 5) }, 5);
    let mut m = CMessage::from_rust(&Message::new(1));
    for e in ALL {
        let want = errno_code(e) as std::os::raw::c_long;
        let name = lookup(want as i32).unwrap().name;
        // SAFETY: `m` is a valid message for each call.
        let got = unsafe {
            [
                dvk_send_T(6, &m, 1000),
                dvk_sendrec_T(6, &mut m, 1000),
                dvk_receive_T(ANY, &mut m, 1000),
            ]
        };
        assert_eq!(got, [want; CALLS], "{e:?} should reach C as {name}");
    }
    assert_eq!(dvk_unbind(0, 5), 0);
    assert_eq!(node.join().expect("fake node"), ALL.len() * CALLS);
}
