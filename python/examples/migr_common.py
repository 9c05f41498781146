"""What the Python migr examples share with the C and Rust ones: message types, payload
words and the block pattern (crates/dvs-examples/src/lib.rs)."""

from array import array

MTYPE_REQUEST = 0x4D01
MTYPE_REPLY = 0x4D02
MTYPE_REFUSED = 0x4D03
W_SEQ, W_ADDR, W_SIZE, W_COUNTER = 0, 1, 2, 1
MAX_BLOCK = 16 << 20
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def pattern(seq, size):
    """The block of ``size`` bytes for sequence number ``seq``: little-endian words
    ``(seq + 1) * GOLDEN ^ index``, the last one truncated."""
    base = ((seq + 1) * _GOLDEN) & _MASK
    words = array("Q", (base ^ i for i in range((size + 7) // 8)))
    if array("H", [1]).tobytes() != b"\x01\x00":
        words.byteswap()
    return words.tobytes()[:size]
