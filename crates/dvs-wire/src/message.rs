//! The fixed-size M3-IPC message and the error codes of IPC calls.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use crate::Ep;

/// Bytes of payload in a [`Message`].
pub const MSG_PAYLOAD: usize = 56;
/// Size of an encoded [`Message`].
pub const MSG_WIRE_SIZE: usize = 64;

/// `mtype` of the message that `receive` returns for a pending notification.
pub const NOTIFY_MTYPE: i32 = 0x1000;

/// A fixed-size IPC message. `source` is filled in by the node kernel, never trusted from
/// the sender; bulk data moves with `vcopy`, not in messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Endpoint that sent the message (set by the node kernel).
    pub source: Ep,
    /// Application-defined message type.
    pub mtype: i32,
    /// Application-defined payload.
    pub payload: [u8; MSG_PAYLOAD],
}

impl Default for Message {
    fn default() -> Self {
        Message {
            source: 0,
            mtype: 0,
            payload: [0; MSG_PAYLOAD],
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("source", &self.source)
            .field("mtype", &self.mtype)
            .finish_non_exhaustive()
    }
}

impl Message {
    /// A message of type `mtype` with an empty payload.
    pub fn new(mtype: i32) -> Self {
        Message {
            mtype,
            ..Default::default()
        }
    }

    /// Reads a little-endian u64 from payload word `i` (0..7).
    pub fn word(&self, i: usize) -> u64 {
        let b = &self.payload[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    /// Writes a little-endian u64 into payload word `i` (0..7).
    pub fn set_word(&mut self, i: usize, v: u64) -> &mut Self {
        self.payload[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// The 64-byte wire form.
    pub fn to_bytes(&self) -> [u8; MSG_WIRE_SIZE] {
        let mut out = [0u8; MSG_WIRE_SIZE];
        out[0..4].copy_from_slice(&self.source.to_le_bytes());
        out[4..8].copy_from_slice(&self.mtype.to_le_bytes());
        out[8..].copy_from_slice(&self.payload);
        out
    }

    /// Parses the 64-byte wire form.
    pub fn from_bytes(b: &[u8; MSG_WIRE_SIZE]) -> Self {
        let mut payload = [0u8; MSG_PAYLOAD];
        payload.copy_from_slice(&b[8..]);
        Message {
            source: i32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            mtype: i32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            payload,
        }
    }
}

// Serialized as a tuple of 64 bytes so that postcard writes exactly 64 bytes, no length.
impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.to_bytes();
        let mut t = s.serialize_tuple(MSG_WIRE_SIZE)?;
        for b in bytes.iter() {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{MSG_WIRE_SIZE} bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Message, A::Error> {
                let mut b = [0u8; MSG_WIRE_SIZE];
                for (i, slot) in b.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(Message::from_bytes(&b))
            }
        }
        d.deserialize_tuple(MSG_WIRE_SIZE, V)
    }
}

/// How long a blocking call may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Timeout {
    /// Wait until the call completes.
    #[default]
    Forever,
    /// Fail with [`Errno::TimedOut`] unless the call can complete at once.
    NoWait,
    /// Wait at most this many milliseconds.
    Millis(u32),
}

impl Timeout {
    /// The timeout as a duration, `None` for forever.
    pub fn as_duration(self) -> Option<std::time::Duration> {
        match self {
            Timeout::Forever => None,
            Timeout::NoWait => Some(std::time::Duration::ZERO),
            Timeout::Millis(ms) => Some(std::time::Duration::from_millis(ms as u64)),
        }
    }
}

/// Errors of IPC calls, mirroring the DVK error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum Errno {
    /// The caller has not bound an endpoint.
    #[error("the caller is not bound to an endpoint")]
    NotBound,
    /// The endpoint is not registered anywhere in the DC.
    #[error("no such endpoint")]
    NoSuchEndpoint,
    /// The endpoint number is out of the DC's range.
    #[error("endpoint number out of range for this DC")]
    BadEndpoint,
    /// The DC does not exist.
    #[error("no such DC")]
    NoSuchDc,
    /// The target belongs to another DC.
    #[error("endpoint belongs to another DC")]
    OtherDc,
    /// This node is not one of the DC's nodes.
    #[error("this node is not part of the DC")]
    NodeNotInDc,
    /// The endpoint is already bound (here or on another node).
    #[error("endpoint already bound")]
    AlreadyBound,
    /// The connection already holds an endpoint.
    #[error("this connection is already bound")]
    ConnAlreadyBound,
    /// The destination process died before it took the message.
    #[error("destination died")]
    DstDied,
    /// The source process died.
    #[error("source died")]
    SrcDied,
    /// The call did not complete within its timeout.
    #[error("timed out")]
    TimedOut,
    /// The endpoint is busy (e.g. `vcopy` with a party that is not blocked in IPC).
    #[error("endpoint busy")]
    Busy,
    /// Not allowed.
    #[error("permission denied")]
    Permission,
    /// `reply` to an endpoint that is not waiting for a reply from the caller.
    #[error("destination is not waiting for a reply from the caller")]
    NotWaiting,
    /// The node hosting the peer is unreachable (link down).
    #[error("the peer's node is unreachable")]
    NodeUnreachable,
    /// Sending to oneself.
    #[error("an endpoint cannot send to itself")]
    SelfSend,
    /// A deadlock would follow (two endpoints sending to each other).
    #[error("call would deadlock")]
    Deadlock,
    /// A `vcopy` address was not mapped in the process.
    #[error("bad address in vcopy")]
    BadAddress,
    /// The request is larger than allowed.
    #[error("request too large")]
    TooBig,
    /// Malformed or invalid argument.
    #[error("invalid argument")]
    Invalid,
    /// The node kernel is shutting down.
    #[error("node kernel shutting down")]
    Shutdown,
    /// Queue limit reached.
    #[error("queue full")]
    QueueFull,
    /// The cluster directory did not answer (a bind or unbind needs it); try again.
    #[error("the cluster directory is unavailable")]
    DirectoryUnavailable,
}

impl Errno {
    /// Every error, in declaration order (for tables and exhaustive tests).
    pub const ALL: [Errno; 23] = [
        Errno::NotBound,
        Errno::NoSuchEndpoint,
        Errno::BadEndpoint,
        Errno::NoSuchDc,
        Errno::OtherDc,
        Errno::NodeNotInDc,
        Errno::AlreadyBound,
        Errno::ConnAlreadyBound,
        Errno::DstDied,
        Errno::SrcDied,
        Errno::TimedOut,
        Errno::Busy,
        Errno::Permission,
        Errno::NotWaiting,
        Errno::NodeUnreachable,
        Errno::SelfSend,
        Errno::Deadlock,
        Errno::BadAddress,
        Errno::TooBig,
        Errno::Invalid,
        Errno::Shutdown,
        Errno::QueueFull,
        Errno::DirectoryUnavailable,
    ];
}
