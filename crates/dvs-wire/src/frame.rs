//! Length-prefixed framing with optional lz4 compression per frame.
//!
//! Layout: `len: u32 LE` (bytes after this field), `flags: u8`, then the payload:
//! `body_len: u32 LE`, a postcard-encoded body and a raw tail (bulk bytes, e.g. vcopy data).
//! With flag [`FLAG_LZ4`], the payload is an lz4 block prefixed by its decompressed size.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame accepted (header excluded).
pub const MAX_FRAME: usize = 4 << 20;
/// Frames whose payload is shorter than this are never compressed.
pub const COMPRESS_MIN: usize = 512;
/// The payload is lz4-compressed.
pub const FLAG_LZ4: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_LZ4;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the limit ([`MAX_FRAME`], or less before a handshake).
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame is shorter than its own header says.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// Unknown flag bits.
    #[error("unknown frame flags {0:#04x}")]
    BadFlags(u8),
    /// The compressed payload does not decompress.
    #[error("bad lz4 payload: {0}")]
    BadCompression(String),
    /// The body does not decode as the expected type.
    #[error("undecodable frame body: {0}")]
    BadBody(String),
    /// The body could not be encoded.
    #[error("cannot encode frame body: {0}")]
    Encode(String),
}

/// Appends one frame holding `body` and `tail` to `out`. With `compress`, the payload is
/// lz4-compressed when that makes it smaller.
pub fn encode<T: Serialize>(
    out: &mut BytesMut,
    body: &T,
    tail: &[u8],
    compress: bool,
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u8(0);
    out.put_u32_le(0);
    let body_start = out.len();
    let mut w = out.split_off(body_start);
    w = postcard::to_extend(body, w).map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = w.len();
    out.unsplit(w);
    out.extend_from_slice(tail);
    let payload_len = 4 + body_len + tail.len();
    if payload_len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge(payload_len));
    }
    out[body_start - 4..body_start].copy_from_slice(&(body_len as u32).to_le_bytes());
    let mut flags = 0;
    let mut len = 1 + payload_len;
    if compress && payload_len >= COMPRESS_MIN {
        let packed = lz4_flex::compress_prepend_size(&out[body_start - 4..]);
        if packed.len() < payload_len {
            out.truncate(body_start - 4);
            out.extend_from_slice(&packed);
            flags |= FLAG_LZ4;
            len = 1 + packed.len();
        }
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4] = flags;
    Ok(())
}

/// Appends one uncompressed frame whose `tail_len`-byte tail `fill` writes in place (e.g.
/// read straight from another process's memory), saving the copy through a separate buffer.
/// If `fill` fails, nothing is appended and its error is returned.
pub fn encode_filled<T: Serialize, E>(
    out: &mut BytesMut,
    body: &T,
    tail_len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<Result<(), E>, FrameError> {
    let start = out.len();
    encode(out, body, &[], false)?;
    let payload_len = out.len() - start - 5 + tail_len;
    if payload_len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge(payload_len));
    }
    let tail_start = out.len();
    out.resize(tail_start + tail_len, 0);
    if let Err(e) = fill(&mut out[tail_start..]) {
        out.truncate(start);
        return Ok(Err(e));
    }
    out[start..start + 4].copy_from_slice(&((1 + payload_len) as u32).to_le_bytes());
    Ok(Ok(()))
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec<T: Serialize>(
    body: &T,
    tail: &[u8],
    compress: bool,
) -> Result<BytesMut, FrameError> {
    let mut b = BytesMut::new();
    encode(&mut b, body, tail, compress)?;
    Ok(b)
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
pub struct FrameDecoder {
    buf: BytesMut,
    /// Largest frame accepted, at most [`MAX_FRAME`].
    limit: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            limit: MAX_FRAME,
        }
    }
}

/// Largest frame accepted on a connection that has not finished its handshake: a peer that is
/// not yet authenticated must not make the node allocate megabytes.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses frames longer than `limit` bytes (capped at [`MAX_FRAME`]).
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            limit: limit.min(MAX_FRAME),
        }
    }

    /// Changes the frame-size limit (capped at [`MAX_FRAME`]), e.g. once a peer is
    /// authenticated.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME);
    }

    /// The buffer to read socket bytes into (append only).
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet consumed as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next whole frame, if one has arrived: its decoded body and its raw tail.
    /// An error means the stream is corrupt and the connection must be closed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Bytes)>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > self.limit + 1 {
            return Err(FrameError::TooLarge(len));
        }
        if len < 1 {
            return Err(FrameError::Truncated("no flags byte"));
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        let mut frame = self.buf.split_to(len).freeze();
        let flags = frame.get_u8();
        decode_payload(flags, frame).map(Some)
    }
}

fn decode_payload<T: DeserializeOwned>(
    flags: u8,
    payload: Bytes,
) -> Result<(T, Bytes), FrameError> {
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let mut payload = if flags & FLAG_LZ4 != 0 {
        if payload.len() < 4 {
            return Err(FrameError::Truncated("no decompressed size"));
        }
        let size = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
        // Checked before decompressing so a hostile size cannot make us allocate.
        if size > MAX_FRAME {
            return Err(FrameError::TooLarge(size));
        }
        Bytes::from(
            lz4_flex::decompress_size_prepended(&payload)
                .map_err(|e| FrameError::BadCompression(e.to_string()))?,
        )
    } else {
        payload
    };
    if payload.len() < 4 {
        return Err(FrameError::Truncated("no body length"));
    }
    let body_len = payload.get_u32_le() as usize;
    if body_len > payload.len() {
        return Err(FrameError::Truncated("body shorter than announced"));
    }
    let body = payload.split_to(body_len);
    let value = postcard::from_bytes(&body).map_err(|e| FrameError::BadBody(e.to_string()))?;
    Ok((value, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{LocalRequest, LocalResponse, Source};
    use crate::message::{Message, Timeout};
    use crate::peer::PeerFrame;
    use crate::peer::{BulkFrame, LinkFrame, VcopyData};

    #[test]
    fn message_is_64_bytes_on_the_wire() {
        let mut m = Message::new(7);
        m.source = -3;
        m.set_word(6, u64::MAX);
        let enc = postcard::to_allocvec(&m).unwrap();
        assert_eq!(enc.len(), crate::MSG_WIRE_SIZE);
        assert_eq!(postcard::from_bytes::<Message>(&enc).unwrap(), m);
    }

    #[test]
    fn round_trip_with_tail_and_compression() {
        let frame = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
            op: 1,
            caller_node: 2,
            dc: 3,
            caller: 4,
            dst: 5,
            dst_addr: 6,
            offset: 7,
            total: 8,
        }));
        let tail = vec![0xabu8; 100_000];
        let mut out = BytesMut::new();
        encode(&mut out, &frame, &tail, true).unwrap();
        assert!(out.len() < 10_000, "compressible tail must be compressed");
        assert_eq!(out[4], FLAG_LZ4);
        encode(&mut out, &PeerFrame::Link(LinkFrame::Ping), &[], true).unwrap();
        let mut dec = FrameDecoder::new();
        // Feed byte by byte: frames come out only when whole.
        let mut got = Vec::new();
        for b in out.iter() {
            dec.extend(&[*b]);
            while let Some(f) = dec.next_frame::<PeerFrame>().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, frame);
        assert_eq!(&got[0].1[..], &tail[..]);
        assert_eq!(got[1].0, PeerFrame::Link(LinkFrame::Ping));
        assert!(got[1].1.is_empty());
    }

    #[test]
    fn filled_frames_decode_like_copied_ones_and_failed_fills_leave_nothing() {
        let frame = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
            op: 9,
            caller_node: 1,
            dc: 0,
            caller: 2,
            dst: 3,
            dst_addr: 4,
            offset: 5,
            total: 6,
        }));
        let tail: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        encode_filled(
            &mut out,
            &frame,
            tail.len(),
            |buf: &mut [u8]| -> Result<(), ()> {
                buf.copy_from_slice(&tail);
                Ok(())
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(out, encode_to_vec(&frame, &tail, false).unwrap());
        let before = out.clone();
        let r = encode_filled(&mut out, &frame, 10, |_: &mut [u8]| Err("unreadable"));
        assert_eq!(r, Ok(Err("unreadable")));
        assert_eq!(out, before, "a failed fill appends nothing");
        let mut dec = FrameDecoder::new();
        dec.extend(&out);
        let (f, t) = dec.next_frame::<PeerFrame>().unwrap().unwrap();
        assert_eq!((f, &t[..]), (frame, &tail[..]));
    }

    #[test]
    fn incompressible_payload_is_sent_plain() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let tail: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let out = encode_to_vec(&PeerFrame::Link(LinkFrame::Pong), &tail, true).unwrap();
        assert_eq!(out[4], 0);
    }

    #[test]
    fn oversized_length_is_refused() {
        let mut dec = FrameDecoder::new();
        dec.extend(&(u32::MAX).to_le_bytes());
        assert!(matches!(
            dec.next_frame::<PeerFrame>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn hostile_lz4_size_is_refused_without_allocating() {
        let mut raw = BytesMut::new();
        raw.put_u32_le(9);
        raw.put_u8(FLAG_LZ4);
        raw.put_u32_le(u32::MAX);
        raw.put_u32_le(0);
        let mut dec = FrameDecoder::new();
        dec.extend(&raw);
        assert!(matches!(
            dec.next_frame::<PeerFrame>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn local_protocol_round_trip() {
        let reqs = vec![
            LocalRequest::Bind {
                version: 1,
                dc: 0,
                ep: 5,
            },
            LocalRequest::Receive {
                src: Source::Any,
                timeout: Timeout::Millis(5),
            },
            LocalRequest::Vcopy {
                src: 1,
                src_addr: 2,
                dst: 3,
                dst_addr: 4,
                len: 5,
                timeout: Timeout::NoWait,
            },
        ];
        let mut out = BytesMut::new();
        for r in &reqs {
            encode(&mut out, r, &[], false).unwrap();
        }
        encode(
            &mut out,
            &LocalResponse::Err(crate::Errno::TimedOut),
            &[],
            false,
        )
        .unwrap();
        let mut dec = FrameDecoder::new();
        dec.extend(&out);
        for r in &reqs {
            assert_eq!(&dec.next_frame::<LocalRequest>().unwrap().unwrap().0, r);
        }
        assert_eq!(
            dec.next_frame::<LocalResponse>().unwrap().unwrap().0,
            LocalResponse::Err(crate::Errno::TimedOut)
        );
        assert_eq!(dec.next_frame::<LocalResponse>().unwrap(), None);
    }
}
