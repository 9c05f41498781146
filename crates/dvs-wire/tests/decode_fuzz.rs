//! Hostile-input properties of the frame decoder: arbitrary bytes, and arbitrary mutations
//! and truncations of valid frames of every `PeerFrame`, `LocalRequest` and `LocalResponse`
//! variant, fed to `FrameDecoder::next_frame`. The decoder must never panic, never allocate
//! more than a frame can legitimately need (announced lengths above `MAX_FRAME` are refused
//! before any allocation), and valid frames must round-trip, whatever chunks they arrive in.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dvs_wire::frame::{self, FrameError, FLAG_LZ4};
use dvs_wire::local::{LocalRequest, LocalResponse, Source};
use dvs_wire::message::{Errno, Message, Timeout, MSG_PAYLOAD};
use dvs_wire::peer::{
    Backend, DeliverKind, MigratedCall, MigratedEndpoint, PeerFrame, RestoreInfo,
};
use dvs_wire::peer::{
    Bound, BulkFrame, Cancel, CtlAnswer, CtlForward, CtlFrame, Deliver, Delivered, Hello,
    ImageChunk, IpcFrame, LinkFrame, MigrCommit, MigrDone, MigrFrame, MigrPrepare, MigrRestore,
    MigrRestored, MigrRollback, MigrStart, MigrStartAck, Notify, Redirect, Refuse, Reply, Unbound,
    VcopyData, VcopyDone, VcopyPull, Welcome,
};
use dvs_wire::{FrameDecoder, MAX_FRAME};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::de::DeserializeOwned;

/// The system allocator, recording the largest single allocation ever requested.
struct Tracking;

static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// The most any single allocation may take while decoding: one whole frame of the largest
/// allowed size (the decoder reserves room for a frame once its header is in), with room for
/// the buffer's growth policy. Anything near an announced hostile length (up to 4 GiB) fails.
const ALLOC_LIMIT: usize = 2 * (MAX_FRAME + 64);

fn assert_no_absurd_allocation() {
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOC_LIMIT,
        "an allocation of {largest} bytes was made (limit {ALLOC_LIMIT})"
    );
}

// ----- strategies for every wire type -------------------------------------------------------

fn errno() -> impl Strategy<Value = Errno> {
    prop::sample::select(Errno::ALL.to_vec())
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<i32>(),
        any::<i32>(),
        prop::collection::vec(any::<u8>(), MSG_PAYLOAD),
    )
        .prop_map(|(source, mtype, p)| {
            let mut payload = [0u8; MSG_PAYLOAD];
            payload.copy_from_slice(&p);
            Message {
                source,
                mtype,
                payload,
            }
        })
}

fn timeout() -> impl Strategy<Value = Timeout> {
    prop_oneof![
        Just(Timeout::Forever),
        Just(Timeout::NoWait),
        any::<u32>().prop_map(Timeout::Millis),
    ]
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![Just(Source::Any), any::<i32>().prop_map(Source::Ep)]
}

fn unit_result() -> impl Strategy<Value = Result<(), Errno>> {
    prop_oneof![Just(Ok(())), errno().prop_map(Err)]
}

fn msg_result() -> impl Strategy<Value = Result<Message, Errno>> {
    prop_oneof![message().prop_map(Ok), errno().prop_map(Err)]
}

fn deliver_kind() -> impl Strategy<Value = DeliverKind> {
    prop_oneof![Just(DeliverKind::Send), Just(DeliverKind::SendRec)]
}

/// Every `PeerFrame` variant.
fn peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![ipc_peer_frame(), migration_peer_frame(), ctl_peer_frame()]
}

/// The handshake, liveness, IPC and vcopy frames.
fn ipc_peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        (any::<u32>(), ".{0,40}", any::<u16>()).prop_map(|(version, cluster, node)| {
            PeerFrame::Link(LinkFrame::Hello(Hello {
                version,
                cluster,
                node,
            }))
        }),
        any::<u16>().prop_map(|node| PeerFrame::Link(LinkFrame::Welcome(Welcome { node }))),
        ".{0,80}".prop_map(|reason| PeerFrame::Link(LinkFrame::Refuse(Refuse { reason }))),
        Just(PeerFrame::Link(LinkFrame::Ping)),
        Just(PeerFrame::Link(LinkFrame::Pong)),
        (
            any::<u64>(),
            any::<u16>(),
            any::<i32>(),
            any::<i32>(),
            deliver_kind(),
            message(),
            timeout()
        )
            .prop_map(|(op, dc, src, dst, kind, msg, timeout)| PeerFrame::Ipc(
                IpcFrame::Deliver(Deliver {
                    op,
                    dc,
                    src,
                    dst,
                    kind,
                    msg,
                    timeout,
                })
            )),
        (any::<u64>(), unit_result())
            .prop_map(|(op, result)| PeerFrame::Ipc(IpcFrame::Delivered(Delivered { op, result }))),
        any::<u64>().prop_map(|op| PeerFrame::Ipc(IpcFrame::Cancel(Cancel { op }))),
        (any::<u16>(), any::<i32>(), any::<i32>(), msg_result()).prop_map(
            |(dc, src, dst, result)| PeerFrame::Ipc(IpcFrame::Reply(Reply {
                dc,
                src,
                dst,
                result
            }))
        ),
        (any::<u16>(), any::<i32>(), any::<i32>(), any::<u64>()).prop_map(
            |(dc, src, dst, value)| PeerFrame::Ipc(IpcFrame::Notify(Notify {
                dc,
                src,
                dst,
                value
            }))
        ),
        (
            (any::<u64>(), any::<u16>(), any::<u16>(), any::<i32>()),
            (
                any::<i32>(),
                any::<u64>(),
                any::<i32>(),
                any::<u64>(),
                any::<u64>()
            )
        )
            .prop_map(
                |((op, caller_node, dc, caller), (src, src_addr, dst, dst_addr, len))| {
                    PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull {
                        op,
                        caller_node,
                        dc,
                        caller,
                        src,
                        src_addr,
                        dst,
                        dst_addr,
                        len,
                    }))
                }
            ),
        (
            (any::<u64>(), any::<u16>(), any::<u16>(), any::<i32>()),
            (any::<i32>(), any::<u64>(), any::<u64>(), any::<u64>())
        )
            .prop_map(
                |((op, caller_node, dc, caller), (dst, dst_addr, offset, total))| {
                    PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
                        op,
                        caller_node,
                        dc,
                        caller,
                        dst,
                        dst_addr,
                        offset,
                        total,
                    }))
                }
            ),
        (any::<u64>(), unit_result())
            .prop_map(|(op, result)| PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { op, result }))),
        (any::<u16>(), any::<i32>())
            .prop_map(|(dc, ep)| PeerFrame::Ipc(IpcFrame::Bound(Bound { dc, ep }))),
        (any::<u16>(), any::<i32>())
            .prop_map(|(dc, ep)| PeerFrame::Ipc(IpcFrame::Unbound(Unbound { dc, ep }))),
    ]
}

fn backend() -> impl Strategy<Value = Backend> {
    prop_oneof![Just(Backend::Criu), Just(Backend::Cooperative)]
}

fn migrated_endpoint() -> impl Strategy<Value = MigratedEndpoint> {
    let call = prop_oneof![
        local_request().prop_map(MigratedCall::Request),
        (any::<i32>(), any::<Option<u32>>())
            .prop_map(|(from, remaining_ms)| MigratedCall::AwaitingReply { from, remaining_ms }),
    ];
    (
        prop::option::of(call),
        prop::collection::vec((any::<i32>(), any::<u64>()), 0..4),
    )
        .prop_map(|(call, notifies)| MigratedEndpoint { call, notifies })
}

fn restore_result() -> impl Strategy<Value = Result<RestoreInfo, String>> {
    prop_oneof![
        // Finite values only: NaN would not compare equal to itself after a round trip.
        (any::<u64>(), -1e12f64..1e12, -1e12f64..1e12).prop_map(
            |(image_bytes, transfer_ms, restore_ms)| Ok(RestoreInfo {
                image_bytes,
                transfer_ms,
                restore_ms,
            })
        ),
        ".{0,40}".prop_map(Err),
    ]
}

/// The migration frames.
fn migration_peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        (any::<u64>(), any::<u16>(), any::<i32>())
            .prop_map(|(op, dc, dst)| PeerFrame::Ipc(IpcFrame::Redirect(Redirect { op, dc, dst }))),
        (
            any::<u64>(),
            any::<u16>(),
            any::<i32>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(id, dc, ep, from, to)| PeerFrame::Migr(MigrFrame::Start(
                MigrStart {
                    id,
                    dc,
                    ep,
                    from,
                    to,
                    backend: Backend::Criu,
                }
            ))),
        any::<u64>().prop_map(|id| PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { id }))),
        (
            (any::<u64>(), any::<u16>(), any::<i32>(), backend()),
            migrated_endpoint(),
            any::<bool>(),
        )
            .prop_map(|((id, dc, ep, backend), state, fail_restore)| {
                PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare {
                    id,
                    dc,
                    ep,
                    backend,
                    state,
                    fail_restore,
                }))
            }),
        (any::<u64>(), ".{0,30}", any::<u64>(), any::<bool>()).prop_map(
            |(id, file, offset, last)| PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk {
                id,
                file,
                offset,
                last
            }))
        ),
        any::<u64>().prop_map(|id| PeerFrame::Migr(MigrFrame::Restore(MigrRestore { id }))),
        (any::<u64>(), restore_result()).prop_map(|(id, result)| PeerFrame::Migr(
            MigrFrame::Restored(MigrRestored { id, result })
        )),
        (any::<u64>(), any::<u16>(), any::<i32>(), any::<u16>()).prop_map(|(id, dc, ep, to)| {
            PeerFrame::Migr(MigrFrame::Commit(MigrCommit { id, dc, ep, to }))
        }),
        (any::<u64>(), any::<u16>(), any::<i32>(), any::<u16>()).prop_map(|(id, dc, ep, from)| {
            PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { id, dc, ep, from }))
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, held)| {
            PeerFrame::Migr(MigrFrame::Done(MigrDone {
                id,
                held,
                longest_hold_us: u64::from(held) * 1000,
            }))
        }),
    ]
}

fn ctl_peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        (any::<u64>(), ".{0,60}").prop_map(|(id, request)| PeerFrame::Ctl(CtlFrame::Forward(
            CtlForward { id, request }
        ))),
        (any::<u64>(), ".{0,60}").prop_map(|(id, response)| PeerFrame::Ctl(CtlFrame::Answer(
            CtlAnswer { id, response }
        ))),
        any::<u64>().prop_map(|id| PeerFrame::Ctl(CtlFrame::End(id))),
        any::<u64>().prop_map(|id| PeerFrame::Ctl(CtlFrame::Cancel(id))),
    ]
}

/// Which `PeerFrame` variant `f` is. No wildcard: a new variant fails to compile here until
/// the strategies above generate it too.
fn peer_variant(f: &PeerFrame) -> usize {
    match f {
        PeerFrame::Link(LinkFrame::Hello(Hello { .. })) => 0,
        PeerFrame::Link(LinkFrame::Welcome(Welcome { .. })) => 1,
        PeerFrame::Link(LinkFrame::Refuse(Refuse { .. })) => 2,
        PeerFrame::Link(LinkFrame::Ping) => 3,
        PeerFrame::Link(LinkFrame::Pong) => 4,
        PeerFrame::Ipc(IpcFrame::Deliver(Deliver { .. })) => 5,
        PeerFrame::Ipc(IpcFrame::Delivered(Delivered { .. })) => 6,
        PeerFrame::Ipc(IpcFrame::Cancel(Cancel { .. })) => 7,
        PeerFrame::Ipc(IpcFrame::Reply(Reply { .. })) => 8,
        PeerFrame::Ipc(IpcFrame::Notify(Notify { .. })) => 9,
        PeerFrame::Ipc(IpcFrame::VcopyPull(VcopyPull { .. })) => 10,
        PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData { .. })) => 11,
        PeerFrame::Ipc(IpcFrame::VcopyDone(VcopyDone { .. })) => 12,
        PeerFrame::Ipc(IpcFrame::Bound(Bound { .. })) => 13,
        PeerFrame::Ipc(IpcFrame::Unbound(Unbound { .. })) => 14,
        PeerFrame::Ipc(IpcFrame::Redirect(Redirect { .. })) => 15,
        PeerFrame::Migr(MigrFrame::Start(MigrStart { .. })) => 16,
        PeerFrame::Migr(MigrFrame::StartAck(MigrStartAck { .. })) => 17,
        PeerFrame::Migr(MigrFrame::Prepare(MigrPrepare { .. })) => 18,
        PeerFrame::Bulk(BulkFrame::ImageChunk(ImageChunk { .. })) => 19,
        PeerFrame::Migr(MigrFrame::Restore(MigrRestore { .. })) => 20,
        PeerFrame::Migr(MigrFrame::Restored(MigrRestored { .. })) => 21,
        PeerFrame::Migr(MigrFrame::Commit(MigrCommit { .. })) => 22,
        PeerFrame::Migr(MigrFrame::Rollback(MigrRollback { .. })) => 23,
        PeerFrame::Migr(MigrFrame::Done(MigrDone { .. })) => 24,
        PeerFrame::Ctl(CtlFrame::Forward(CtlForward { .. })) => 25,
        PeerFrame::Ctl(CtlFrame::Answer(CtlAnswer { .. })) => 26,
        PeerFrame::Ctl(CtlFrame::End(_)) => 27,
        PeerFrame::Ctl(CtlFrame::Cancel(_)) => 28,
    }
}
const PEER_VARIANTS: usize = 29;

/// Which `LocalRequest` variant `r` is (exhaustive, like [`peer_variant`]).
fn request_variant(r: &LocalRequest) -> usize {
    match r {
        LocalRequest::Bind { .. } => 0,
        LocalRequest::Unbind => 1,
        LocalRequest::Send { .. } => 2,
        LocalRequest::Receive { .. } => 3,
        LocalRequest::SendRec { .. } => 4,
        LocalRequest::Reply { .. } => 5,
        LocalRequest::Notify { .. } => 6,
        LocalRequest::Vcopy { .. } => 7,
        LocalRequest::GetEp => 8,
        LocalRequest::WaitForBind { .. } => 9,
        LocalRequest::BindRestored { .. } => 10,
        LocalRequest::Snapshot { .. } => 11,
    }
}
const REQUEST_VARIANTS: usize = 12;

/// Which `LocalResponse` variant `r` is (exhaustive, like [`peer_variant`]).
fn response_variant(r: &LocalResponse) -> usize {
    match r {
        LocalResponse::Done => 0,
        LocalResponse::Msg(_) => 1,
        LocalResponse::Ep { .. } => 2,
        LocalResponse::Err(_) => 3,
        LocalResponse::Checkpoint => 4,
        LocalResponse::Resume => 5,
        LocalResponse::Exit => 6,
    }
}
const RESPONSE_VARIANTS: usize = 7;

fn local_request() -> impl Strategy<Value = LocalRequest> {
    prop_oneof![
        (any::<u32>(), any::<u16>(), any::<i32>())
            .prop_map(|(version, dc, ep)| LocalRequest::Bind { version, dc, ep }),
        Just(LocalRequest::Unbind),
        (any::<i32>(), message(), timeout()).prop_map(|(dst, msg, timeout)| LocalRequest::Send {
            dst,
            msg,
            timeout
        }),
        (source(), timeout()).prop_map(|(src, timeout)| LocalRequest::Receive { src, timeout }),
        (any::<i32>(), message(), timeout())
            .prop_map(|(dst, msg, timeout)| LocalRequest::SendRec { dst, msg, timeout }),
        (any::<i32>(), message()).prop_map(|(dst, msg)| LocalRequest::Reply { dst, msg }),
        (any::<i32>(), any::<u64>()).prop_map(|(dst, value)| LocalRequest::Notify { dst, value }),
        (
            any::<i32>(),
            any::<u64>(),
            any::<i32>(),
            any::<u64>(),
            any::<u64>(),
            timeout()
        )
            .prop_map(
                |(src, src_addr, dst, dst_addr, len, timeout)| LocalRequest::Vcopy {
                    src,
                    src_addr,
                    dst,
                    dst_addr,
                    len,
                    timeout,
                }
            ),
        Just(LocalRequest::GetEp),
        (any::<i32>(), timeout())
            .prop_map(|(ep, timeout)| LocalRequest::WaitForBind { ep, timeout }),
        (any::<u32>(), any::<u16>(), any::<i32>(), any::<u64>()).prop_map(
            |(version, dc, ep, migration)| LocalRequest::BindRestored {
                version,
                dc,
                ep,
                migration
            }
        ),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..200))
            .prop_map(|data| LocalRequest::Snapshot { data }),
    ]
}

fn local_response() -> impl Strategy<Value = LocalResponse> {
    prop_oneof![
        Just(LocalResponse::Done),
        message().prop_map(LocalResponse::Msg),
        (any::<u16>(), any::<i32>(), any::<u16>()).prop_map(|(dc, ep, node)| LocalResponse::Ep {
            dc,
            ep,
            node
        }),
        errno().prop_map(LocalResponse::Err),
        Just(LocalResponse::Checkpoint),
        Just(LocalResponse::Resume),
        Just(LocalResponse::Exit),
    ]
}

/// A value of any of the three wire types.
#[derive(Clone, Debug)]
enum AnyBody {
    Peer(PeerFrame),
    Request(LocalRequest),
    Response(LocalResponse),
}

/// A valid encoded frame of any wire type: a tail (sometimes large and compressible, so that
/// lz4 frames are covered too) and compression on or off.
fn valid_frame() -> impl Strategy<Value = Vec<u8>> {
    let body = prop_oneof![
        peer_frame().prop_map(AnyBody::Peer),
        local_request().prop_map(AnyBody::Request),
        local_response().prop_map(AnyBody::Response),
    ];
    let tail = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (any::<u8>(), 600usize..3000).prop_map(|(b, n)| vec![b; n]),
    ];
    (body, tail, any::<bool>()).prop_map(|(body, tail, compress)| {
        let encoded = match &body {
            AnyBody::Peer(b) => frame::encode_to_vec(b, &tail, compress),
            AnyBody::Request(b) => frame::encode_to_vec(b, &tail, compress),
            AnyBody::Response(b) => frame::encode_to_vec(b, &tail, compress),
        };
        encoded.expect("valid frames encode").to_vec()
    })
}

/// One way to damage an encoded frame.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR the byte at (index modulo length) with a non-zero value.
    Flip(usize, u8),
    /// Keep only the first (n modulo length) bytes.
    Truncate(usize),
    /// Insert bytes at (index modulo length + 1).
    Insert(usize, Vec<u8>),
    /// Remove up to `n` bytes at (index modulo length).
    Remove(usize, usize),
    /// Overwrite the length prefix.
    SetLen(u32),
    /// Overwrite the flags byte.
    SetFlags(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<u32>().prop_map(Mutation::SetLen),
        any::<u8>().prop_map(Mutation::SetFlags),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match m {
        Mutation::Flip(i, x) => bytes[i % n] ^= x,
        Mutation::Truncate(k) => bytes.truncate(k % n),
        Mutation::Insert(i, v) => {
            let at = i % (n + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Mutation::Remove(i, k) => {
            let at = i % n;
            let end = (at + k).min(n);
            bytes.drain(at..end);
        }
        Mutation::SetLen(len) if n >= 4 => bytes[..4].copy_from_slice(&len.to_le_bytes()),
        Mutation::SetFlags(f) if n >= 5 => bytes[4] = *f,
        Mutation::SetLen(_) | Mutation::SetFlags(_) => {}
    }
}

/// Feeds `bytes` in chunks of the given sizes (cycled) and takes frames of type `T` after each
/// chunk until the decoder reports an error (the connection would be closed) or the input ends.
/// Returns how many frames came out. Panics propagate, which is what the tests look for.
fn drain<T: DeserializeOwned>(bytes: &[u8], chunks: &[usize]) -> usize {
    let mut dec = FrameDecoder::new();
    let mut frames = 0;
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        i += 1;
        dec.extend(&rest[..n]);
        rest = &rest[n..];
        loop {
            match dec.next_frame::<T>() {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(_) => return frames,
            }
        }
        assert!(
            dec.buffer().capacity() <= ALLOC_LIMIT,
            "decoder buffer grew to {} bytes",
            dec.buffer().capacity()
        );
    }
    frames
}

/// Decodes `bytes` as each of the three wire types.
fn drain_all(bytes: &[u8], chunks: &[usize]) {
    drain::<PeerFrame>(bytes, chunks);
    drain::<LocalRequest>(bytes, chunks);
    drain::<LocalResponse>(bytes, chunks);
}

/// Encodes `value` with `tail`, feeds it back in the given chunk sizes and checks that exactly
/// the same value and tail come out, and nothing else.
fn round_trip<T>(value: &T, tail: &[u8], compress: bool, chunks: &[usize])
where
    T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = frame::encode_to_vec(value, tail, compress).expect("valid frames encode");
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let mut rest = &bytes[..];
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks[i % chunks.len()].clamp(1, rest.len());
        i += 1;
        dec.extend(&rest[..n]);
        rest = &rest[n..];
        while let Some(f) = dec.next_frame::<T>().expect("a valid frame decodes") {
            got.push(f);
        }
    }
    assert_eq!(got.len(), 1, "one frame in, one frame out");
    assert_eq!(&got[0].0, value);
    assert_eq!(&got[0].1[..], tail);
    assert_eq!(dec.buffered(), 0);
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..300, 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in chunk_sizes(),
    ) {
        drain_all(&bytes, &chunks);
        assert_no_absurd_allocation();
    }

    #[test]
    fn arbitrary_bytes_after_a_plausible_header_never_panic(
        len in 0u32..4096,
        flags in any::<u8>(),
        body in prop::collection::vec(any::<u8>(), 0..4096),
        chunks in chunk_sizes(),
    ) {
        // A header that announces a frame the body can complete, so that the payload decoding
        // paths (flags, lz4, body length, postcard) see the garbage, not only the length check.
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.push(flags);
        bytes.extend_from_slice(&body);
        drain_all(&bytes, &chunks);
        assert_no_absurd_allocation();
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        frame in valid_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
        chunks in chunk_sizes(),
    ) {
        let mut bytes = frame;
        for m in &mutations {
            apply(&mut bytes, m);
        }
        drain_all(&bytes, &chunks);
        assert_no_absurd_allocation();
    }

    #[test]
    fn strict_prefixes_of_a_valid_frame_wait_for_more(frame in valid_frame(), cut in any::<usize>()) {
        let cut = cut % frame.len();
        for_each_type_expect_none(&frame[..cut]);
    }

    #[test]
    fn lengths_above_the_limit_are_refused_from_the_header_alone(
        len in (MAX_FRAME as u32 + 2)..=u32::MAX,
        more in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut dec = FrameDecoder::new();
        dec.extend(&len.to_le_bytes());
        dec.extend(&more);
        prop_assert_eq!(
            dec.next_frame::<PeerFrame>().err(),
            Some(FrameError::TooLarge(len as usize))
        );
        prop_assert!(dec.buffer().capacity() < 4096, "nothing reserved for a refused frame");
        assert_no_absurd_allocation();
    }

    #[test]
    fn hostile_lz4_sizes_are_refused_before_decompressing(
        size in (MAX_FRAME as u32 + 1)..=u32::MAX,
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut payload = size.to_le_bytes().to_vec();
        payload.extend_from_slice(&junk);
        let mut bytes = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
        bytes.push(FLAG_LZ4);
        bytes.extend_from_slice(&payload);
        let mut dec = FrameDecoder::new();
        dec.extend(&bytes);
        prop_assert_eq!(
            dec.next_frame::<LocalRequest>().err(),
            Some(FrameError::TooLarge(size as usize))
        );
        assert_no_absurd_allocation();
    }

    #[test]
    fn peer_frames_round_trip(
        f in peer_frame(),
        tail in prop::collection::vec(any::<u8>(), 0..1500),
        compress in any::<bool>(),
        chunks in chunk_sizes(),
    ) {
        round_trip(&f, &tail, compress, &chunks);
    }

    #[test]
    fn compressible_peer_frames_round_trip(
        f in peer_frame(),
        byte in any::<u8>(),
        n in 512usize..100_000,
        chunks in chunk_sizes(),
    ) {
        let tail = vec![byte; n];
        round_trip(&f, &tail, true, &chunks);
    }

    #[test]
    fn local_requests_round_trip(r in local_request(), compress in any::<bool>(), chunks in chunk_sizes()) {
        round_trip(&r, &[], compress, &chunks);
    }

    #[test]
    fn local_responses_round_trip(r in local_response(), compress in any::<bool>(), chunks in chunk_sizes()) {
        round_trip(&r, &[], compress, &chunks);
    }

    #[test]
    fn back_to_back_frames_all_come_out(
        frames in prop::collection::vec(peer_frame(), 1..20),
        chunks in chunk_sizes(),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend_from_slice(&frame::encode_to_vec(f, &[], false).unwrap());
        }
        prop_assert_eq!(drain::<PeerFrame>(&bytes, &chunks), frames.len());
    }
}

/// A strict prefix of a frame is never a frame nor an error, whatever type is expected.
fn for_each_type_expect_none(prefix: &[u8]) {
    fn check<T: DeserializeOwned>(prefix: &[u8]) {
        let mut dec = FrameDecoder::new();
        dec.extend(prefix);
        assert!(
            matches!(dec.next_frame::<T>(), Ok(None)),
            "a {}-byte prefix of a valid frame must wait for more bytes",
            prefix.len()
        );
        assert_eq!(dec.buffered(), prefix.len(), "nothing consumed");
    }
    check::<PeerFrame>(prefix);
    check::<LocalRequest>(prefix);
    check::<LocalResponse>(prefix);
}

#[test]
fn every_frame_error_kind_is_reachable() {
    // Sanity of the hostile cases above: each refusal path exists and is an error, not a panic.
    let mut dec = FrameDecoder::new();
    dec.extend(&0u32.to_le_bytes());
    assert_eq!(
        dec.next_frame::<PeerFrame>().err(),
        Some(FrameError::Truncated("no flags byte"))
    );

    let mut dec = FrameDecoder::new();
    dec.extend(&[1, 0, 0, 0, 0x80]);
    assert_eq!(
        dec.next_frame::<PeerFrame>().err(),
        Some(FrameError::BadFlags(0x80))
    );

    let mut dec = FrameDecoder::new();
    dec.extend(&[3, 0, 0, 0, 0, 1, 2]);
    assert_eq!(
        dec.next_frame::<PeerFrame>().err(),
        Some(FrameError::Truncated("no body length"))
    );

    let mut dec = FrameDecoder::new();
    dec.extend(&[5, 0, 0, 0, 0, 9, 0, 0, 0]);
    assert_eq!(
        dec.next_frame::<PeerFrame>().err(),
        Some(FrameError::Truncated("body shorter than announced"))
    );

    let mut dec = FrameDecoder::new();
    dec.extend(&[6, 0, 0, 0, 0, 1, 0, 0, 0, 0xff]);
    assert!(matches!(
        dec.next_frame::<LocalRequest>(),
        Err(FrameError::BadBody(_))
    ));

    let mut dec = FrameDecoder::new();
    dec.extend(&[9, 0, 0, 0, FLAG_LZ4, 8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        dec.next_frame::<LocalRequest>(),
        Err(FrameError::BadCompression(_))
    ));
}

/// Distinct variants among `n` values drawn from `strategy`, as numbered by `variant`.
fn variants_drawn<S: Strategy>(strategy: S, variant: fn(&S::Value) -> usize, n: usize) -> usize {
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let v = strategy.new_tree(&mut runner).expect("a value").current();
        seen.insert(variant(&v));
    }
    seen.len()
}

#[test]
fn strategies_generate_every_variant() {
    assert_eq!(
        variants_drawn(peer_frame(), peer_variant, 4000),
        PEER_VARIANTS
    );
    assert_eq!(
        variants_drawn(local_request(), request_variant, 2000),
        REQUEST_VARIANTS
    );
    assert_eq!(
        variants_drawn(local_response(), response_variant, 1000),
        RESPONSE_VARIANTS
    );
}
