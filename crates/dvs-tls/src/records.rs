//! The TLS 1.3 record layer of an established peer link, on the link's own buffers.
//!
//! rustls runs the handshake (certificates, key exchange); its traffic secrets are then taken
//! over, as kernel TLS offload takes them, and the application-data records are sealed and
//! opened here with ring's AEAD, in place in the link's buffers (RFC 8446 §5.2–5.3: a 5-byte
//! header as additional data, the content type after the data, the nonce the IV XOR the
//! record sequence number). What crosses the wire is ordinary TLS 1.3 records. Keeping the
//! bytes in our buffers saves the copies and allocations rustls's buffered API makes per
//! record, which cost half of the bandwidth of bulk vcopy traffic.
//!
//! Records other than application data (an alert, a key update) end the link: both ends are
//! dvs nodes, which never send them after the handshake. A link that has sealed or opened
//! [`MAX_RECORDS`] records must be replaced by a new handshake (the AES-GCM usage limit).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Largest plaintext of one record (TLS 1.3).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Record header: content type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag.
const TAG: usize = 16;
/// Content type of application data.
const APPLICATION_DATA: u8 = 23;
/// Largest ciphertext of one record accepted (TLS 1.3: plaintext + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Records one key may protect on a link before it must be replaced (RFC 8446 §5.5 allows
/// 2^24.5 full-size records with AES-GCM).
pub const MAX_RECORDS: u64 = 1 << 24;

/// Why a record could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The negotiated cipher suite is not one this layer runs.
    #[error("cipher suite not supported by the record layer")]
    Suite,
    /// A record failed authentication: forged, corrupted or out of order.
    #[error("a TLS record failed authentication")]
    BadRecord,
    /// A record header is malformed or announces too much.
    #[error("malformed TLS record header")]
    BadHeader,
    /// A record of another content type (alert, handshake) arrived.
    #[error("unexpected TLS record of content type {0}")]
    UnexpectedType(u8),
    /// The key reached its usage limit.
    #[error("the link's key protected {MAX_RECORDS} records; a new handshake is needed")]
    Exhausted,
}

/// One direction's key, IV and next sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::Suite)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record, which it uses up.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= MAX_RECORDS {
            return Err(RecordError::Exhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals outgoing application data into records.
pub struct Sealer(Direction);

/// Opens incoming records.
pub struct Opener(Direction);

/// Takes the traffic secrets over from a rustls session whose handshake is done (and that
/// has nothing buffered to send): the record layer of the link, `(sealer, opener)`.
pub fn take_over(conn: impl Into<rustls::Connection>) -> Result<(Sealer, Opener), String> {
    let secrets = conn
        .into()
        .dangerous_extract_secrets()
        .map_err(|e| format!("cannot take over the TLS session: {e}"))?;
    record_layer(secrets).map_err(|e| e.to_string())
}

/// The record layer of a link whose handshake is done: `(sealer, opener)`.
pub fn record_layer(secrets: ExtractedSecrets) -> Result<(Sealer, Opener), RecordError> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    Ok((
        Sealer(Direction::new(tx_seq, tx)?),
        Opener(Direction::new(rx_seq, rx)?),
    ))
}

/// Bytes the records of `n` plaintext bytes take on the wire.
pub fn sealed_len(n: usize) -> usize {
    n + n.div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG)
}

impl Sealer {
    /// Appends `plaintext` to `out` as records.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.reserve(sealed_len(plaintext.len()));
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            let nonce = self.0.next_nonce()?;
            let len = chunk.len() + 1 + TAG;
            let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, (len & 0xff) as u8];
            out.extend_from_slice(&header);
            let start = out.len();
            out.extend_from_slice(chunk);
            out.push(APPLICATION_DATA);
            let tag = self
                .0
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start..])
                .map_err(|_| RecordError::BadRecord)?;
            out.extend_from_slice(tag.as_ref());
        }
        Ok(())
    }
}

impl Opener {
    /// Opens the complete records at the front of `input` (in place), hands their data to
    /// `sink` in order, and returns how many bytes of `input` they took. A partial record at
    /// the end stays for the next call.
    pub fn open(
        &mut self,
        input: &mut [u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<usize, RecordError> {
        let mut at = 0;
        while input.len() - at >= HEADER {
            let h = &input[at..at + HEADER];
            let (kind, len) = (h[0], usize::from(u16::from_be_bytes([h[3], h[4]])));
            if kind != APPLICATION_DATA || h[1] != 3 || h[2] != 3 {
                return Err(RecordError::BadHeader);
            }
            if !(1 + TAG..=MAX_CIPHERTEXT).contains(&len) {
                return Err(RecordError::BadHeader);
            }
            if input.len() - at < HEADER + len {
                break;
            }
            let header: [u8; HEADER] = input[at..at + HEADER].try_into().expect("5 bytes");
            let nonce = self.0.next_nonce()?;
            let body = &mut input[at + HEADER..at + HEADER + len];
            let inner = self
                .0
                .key
                .open_in_place(nonce, Aad::from(header), body)
                .map_err(|_| RecordError::BadRecord)?;
            // The content type is the last non-zero byte (after optional zero padding).
            let end = inner
                .iter()
                .rposition(|b| *b != 0)
                .ok_or(RecordError::BadRecord)?;
            if inner[end] != APPLICATION_DATA {
                return Err(RecordError::UnexpectedType(inner[end]));
            }
            sink(&inner[..end]);
            at += HEADER + len;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn pair() -> (Sealer, Opener) {
        let key = AeadKey::from([7u8; 32]);
        let secrets = |k: &AeadKey| ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(<[u8; 32]>::try_from(k.as_ref()).unwrap()),
            iv: Iv::new([9u8; 12]),
        };
        let tx = Direction::new(0, secrets(&key)).unwrap();
        let rx = Direction::new(0, secrets(&key)).unwrap();
        (Sealer(tx), Opener(rx))
    }

    #[test]
    fn records_round_trip_across_any_split() {
        let (mut s, mut o) = pair();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Vec::new();
        s.seal(&data, &mut wire).unwrap();
        s.seal(b"tail", &mut wire).unwrap();
        assert_eq!(wire.len(), sealed_len(data.len()) + sealed_len(4));
        // Fed in odd pieces, as a socket delivers them.
        let mut plain = Vec::new();
        let mut pending = Vec::new();
        for piece in wire.chunks(7919) {
            pending.extend_from_slice(piece);
            let used = o
                .open(&mut pending, |d| plain.extend_from_slice(d))
                .unwrap();
            pending.drain(..used);
        }
        assert!(pending.is_empty());
        assert_eq!(&plain[..data.len()], &data[..]);
        assert_eq!(&plain[data.len()..], b"tail");
    }

    #[test]
    fn tampered_replayed_or_foreign_records_are_refused() {
        let (mut s, mut o) = pair();
        let mut wire = Vec::new();
        s.seal(b"hello", &mut wire).unwrap();
        let mut bad = wire.clone();
        bad[HEADER + 1] ^= 1;
        assert_eq!(o.open(&mut bad, |_| {}), Err(RecordError::BadRecord));
        // A replayed record fails: the receiver's sequence number moved on.
        let (mut s, mut o) = pair();
        let mut wire = Vec::new();
        s.seal(b"once", &mut wire).unwrap();
        let mut again = wire.clone();
        assert_eq!(o.open(&mut wire, |_| {}), Ok(again.len()));
        assert_eq!(o.open(&mut again, |_| {}), Err(RecordError::BadRecord));
        // An alert or a record announcing too much is refused before decryption.
        let mut alert = vec![21, 3, 3, 0, 2, 1, 0];
        assert_eq!(o.open(&mut alert, |_| {}), Err(RecordError::BadHeader));
        let mut huge = vec![23, 3, 3, 0xff, 0xff];
        assert_eq!(o.open(&mut huge, |_| {}), Err(RecordError::BadHeader));
    }
}
