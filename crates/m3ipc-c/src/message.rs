//! The C `message`: `m_source`, `m_type` and the DVK's MINIX-style payload union, laid out
//! exactly as the 64 bytes of a Rust [`Message`] on the wire (little-endian hosts).
//!
//! The structs below are the Rust mirror of the header's; [`FIELDS`] lists every field the
//! header names with its offset and size, so that a test can compare them with what a C
//! compiler makes of `m3ipc.h`.

use std::mem::{offset_of, size_of};
use std::os::raw::{c_char, c_int, c_long, c_short};

use m3ipc::{Message, MSG_PAYLOAD};

#[cfg(target_endian = "big")]
compile_error!("the C message is the wire form in memory, which is little-endian");

/// Length of the character array of `mess_3` (fills the payload).
pub const M3_STRING: usize = 40;

/// Payload layout 1: three ints, three pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess1 {
    pub m1i1: c_int,
    pub m1i2: c_int,
    pub m1i3: c_int,
    pub m1p1: *mut c_char,
    pub m1p2: *mut c_char,
    pub m1p3: *mut c_char,
}

/// Payload layout 2: three ints, two longs, a pointer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess2 {
    pub m2i1: c_int,
    pub m2i2: c_int,
    pub m2i3: c_int,
    pub m2l1: c_long,
    pub m2l2: c_long,
    pub m2p1: *mut c_char,
}

/// Payload layout 3: two ints, a pointer, a short string.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess3 {
    pub m3i1: c_int,
    pub m3i2: c_int,
    pub m3p1: *mut c_char,
    pub m3ca1: [c_char; M3_STRING],
}

/// Payload layout 4: five longs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess4 {
    pub m4l1: c_long,
    pub m4l2: c_long,
    pub m4l3: c_long,
    pub m4l4: c_long,
    pub m4l5: c_long,
}

/// Payload layout 5: two shorts, two ints, three longs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess5 {
    pub m5c1: c_short,
    pub m5c2: c_short,
    pub m5i1: c_int,
    pub m5i2: c_int,
    pub m5l1: c_long,
    pub m5l2: c_long,
    pub m5l3: c_long,
}

/// Payload layout 7: five ints, two pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mess7 {
    pub m7i1: c_int,
    pub m7i2: c_int,
    pub m7i3: c_int,
    pub m7i4: c_int,
    pub m7i5: c_int,
    pub m7p1: *mut c_char,
    pub m7p2: *mut c_char,
}

/// The payload union (`m_u`).
#[repr(C)]
#[derive(Clone, Copy)]
pub union MessageUnion {
    pub m_m1: Mess1,
    pub m_m2: Mess2,
    pub m_m3: Mess3,
    pub m_m4: Mess4,
    pub m_m5: Mess5,
    pub m_m7: Mess7,
    /// The payload as the little-endian 64-bit words of [`Message::word`].
    pub m_words: [u64; 7],
    /// The raw payload bytes.
    pub m_payload: [u8; MSG_PAYLOAD],
}

/// The C `message`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CMessage {
    /// Who sent it (set by the node kernel).
    pub m_source: c_int,
    /// Application-defined type.
    pub m_type: c_int,
    /// The payload.
    pub m_u: MessageUnion,
}

const _: () = assert!(size_of::<CMessage>() == m3ipc::MSG_PAYLOAD + 8);
const _: () = assert!(size_of::<MessageUnion>() == MSG_PAYLOAD);
const _: () = assert!(offset_of!(CMessage, m_u) == 8);

impl CMessage {
    /// The Rust message with the same 64 bytes.
    pub fn to_rust(&self) -> Message {
        // SAFETY: CMessage is 64 bytes without padding between its three parts (asserted
        // above), and the union is read as plain bytes, which every bit pattern is.
        let bytes: [u8; 64] = unsafe { std::mem::transmute_copy(self) };
        Message::from_bytes(&bytes)
    }

    /// The C message with the same 64 bytes as `m`.
    pub fn from_rust(m: &Message) -> CMessage {
        CMessage {
            m_source: m.source,
            m_type: m.mtype,
            m_u: MessageUnion {
                m_payload: m.payload,
            },
        }
    }
}

/// A field the header names, with its place in the 64-byte message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// The name a C program uses (`m_source`, `m1_i1`, ...).
    pub name: &'static str,
    /// Byte offset from the start of the message.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

macro_rules! fields {
    ($( $name:literal => $member:ident . $field:ident : $ty:ty ),* $(,)?) => {
        &[
            Field { name: "m_source", offset: offset_of!(CMessage, m_source), size: 4 },
            Field { name: "m_type", offset: offset_of!(CMessage, m_type), size: 4 },
            $( Field {
                name: $name,
                offset: offset_of!(CMessage, m_u) + offset_of!($ty, $field),
                size: size_of_field::<$ty, _>(|s: &$ty| &s.$field),
            }, )*
        ]
    };
}

/// The size of the field that `get` picks (a way to name a field's type in a const table).
const fn size_of_field<S, F>(_get: fn(&S) -> &F) -> usize {
    size_of::<F>()
}

/// Every field of the header's `message`, under the names C programs use.
pub const FIELDS: &[Field] = fields![
    "m1_i1" => m_m1.m1i1: Mess1, "m1_i2" => m_m1.m1i2: Mess1, "m1_i3" => m_m1.m1i3: Mess1,
    "m1_p1" => m_m1.m1p1: Mess1, "m1_p2" => m_m1.m1p2: Mess1, "m1_p3" => m_m1.m1p3: Mess1,
    "m2_i1" => m_m2.m2i1: Mess2, "m2_i2" => m_m2.m2i2: Mess2, "m2_i3" => m_m2.m2i3: Mess2,
    "m2_l1" => m_m2.m2l1: Mess2, "m2_l2" => m_m2.m2l2: Mess2, "m2_p1" => m_m2.m2p1: Mess2,
    "m3_i1" => m_m3.m3i1: Mess3, "m3_i2" => m_m3.m3i2: Mess3, "m3_p1" => m_m3.m3p1: Mess3,
    "m3_ca1" => m_m3.m3ca1: Mess3,
    "m4_l1" => m_m4.m4l1: Mess4, "m4_l2" => m_m4.m4l2: Mess4, "m4_l3" => m_m4.m4l3: Mess4,
    "m4_l4" => m_m4.m4l4: Mess4, "m4_l5" => m_m4.m4l5: Mess4,
    "m5_c1" => m_m5.m5c1: Mess5, "m5_c2" => m_m5.m5c2: Mess5, "m5_i1" => m_m5.m5i1: Mess5,
    "m5_i2" => m_m5.m5i2: Mess5, "m5_l1" => m_m5.m5l1: Mess5, "m5_l2" => m_m5.m5l2: Mess5,
    "m5_l3" => m_m5.m5l3: Mess5,
    "m7_i1" => m_m7.m7i1: Mess7, "m7_i2" => m_m7.m7i2: Mess7, "m7_i3" => m_m7.m7i3: Mess7,
    "m7_i4" => m_m7.m7i4: Mess7, "m7_i5" => m_m7.m7i5: Mess7, "m7_p1" => m_m7.m7p1: Mess7,
    "m7_p2" => m_m7.m7p2: Mess7,
];

/// The size of the C `message`.
pub const MESSAGE_SIZE: usize = size_of::<CMessage>();
/// Where the payload words ([`Message::word`]) start in the C `message` (`m_word[0]`).
pub const WORDS_OFFSET: usize = offset_of!(CMessage, m_u);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_and_rust_messages_have_the_same_bytes() {
        let mut m = Message::new(0x4d01);
        m.source = -7;
        for i in 0..7 {
            m.set_word(i, 0x0102_0304_0506_0700 + i as u64);
        }
        let c = CMessage::from_rust(&m);
        assert_eq!(c.m_source, -7);
        assert_eq!(c.m_type, 0x4d01);
        // SAFETY: every union member is plain data.
        let (w, i1) = unsafe { (c.m_u.m_words, c.m_u.m_m1.m1i1) };
        assert_eq!(w[3], m.word(3));
        assert_eq!(i1 as u32, m.word(0) as u32);
        assert_eq!(c.to_rust(), m);
    }

    #[test]
    fn every_field_lies_in_the_message() {
        for f in FIELDS {
            assert!(f.offset + f.size <= MESSAGE_SIZE, "{f:?}");
            if f.name.starts_with('m') && f.name != "m_source" && f.name != "m_type" {
                assert!(f.offset >= WORDS_OFFSET, "{f:?}");
            }
        }
    }
}
