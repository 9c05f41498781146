//! The server's in-memory cache and the helper child's function, both computable by the
//! client from a key alone.
//!
//! Word `i` of the cache is [`cache_word`]`(i)`. A lookup of key K folds the
//! [`SLICE_WORDS`] words that start at [`slice_start`]`(K, words)`; the server reads them
//! from its (migrated) memory, the client recomputes them, so a cache page lost or damaged
//! by a move changes the answer.

use super::{mix64, GOLDEN};

/// Words one lookup folds (64 KiB): enough work per request that the workers compute for
/// real, small enough that a request stays well under a millisecond.
pub const SLICE_WORDS: usize = 8192;
/// The smallest cache (a `--cache-mb 0` server still has one slice to look up).
pub const MIN_CACHE_BYTES: u64 = (SLICE_WORDS * 8) as u64;

/// Separates the cache's words from other uses of [`mix64`].
const CACHE_SEED: u64 = 0x6361_6368_655f_7631;
/// Separates the helper's values from other uses of [`mix64`].
const HELPER_SEED: u64 = 0x6865_6c70_6572_7631;

/// Word `i` of every cache.
pub fn cache_word(i: u64) -> u64 {
    mix64(i ^ CACHE_SEED)
}

/// The cache size a server configured with `mb` MiB uses.
pub fn cache_bytes(mb: u64) -> u64 {
    (mb << 20).max(MIN_CACHE_BYTES)
}

/// The first word of key `key`'s slice in a cache of `words` words (at least
/// [`SLICE_WORDS`]).
pub fn slice_start(key: u64, words: u64) -> u64 {
    mix64(key) % (words - SLICE_WORDS as u64 + 1)
}

/// Folds words into a checksum that depends on their order.
fn fold(words: impl Iterator<Item = u64>) -> u64 {
    words.fold(0u64, |acc, w| (acc.rotate_left(7) ^ w).wrapping_mul(GOLDEN))
}

/// The checksum a lookup of `key` must answer from a cache of `cache_bytes` bytes, computed
/// without the cache.
pub fn lookup_checksum(cache_bytes: u64, key: u64) -> u64 {
    let start = slice_start(key, cache_bytes / 8);
    fold((start..start + SLICE_WORDS as u64).map(cache_word))
}

/// What the helper child answers for `key` at log position `log_seq`.
pub fn helper_value(key: u64, log_seq: u64) -> u64 {
    mix64(key.rotate_left(17) ^ log_seq.wrapping_mul(GOLDEN) ^ HELPER_SEED)
}

/// The server's cache: real pages, each word written at start.
pub struct Cache {
    words: Vec<u64>,
}

impl Cache {
    /// A cache of [`cache_bytes`]`(mb)` bytes, filled.
    pub fn new(mb: u64) -> Cache {
        let n = cache_bytes(mb) / 8;
        Cache {
            words: (0..n).map(cache_word).collect(),
        }
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// The checksum of key `key`'s slice, read from memory.
    pub fn lookup(&self, key: u64) -> u64 {
        let start = slice_start(key, self.words.len() as u64) as usize;
        fold(self.words[start..start + SLICE_WORDS].iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_formula_agree() {
        let c = Cache::new(1);
        assert_eq!(c.bytes(), 1 << 20);
        for key in [0, 1, 77, u64::MAX, 1 << 40] {
            assert_eq!(c.lookup(key), lookup_checksum(c.bytes(), key), "key {key}");
        }
        let small = Cache::new(0);
        assert_eq!(small.bytes(), MIN_CACHE_BYTES);
        assert_eq!(small.lookup(5), lookup_checksum(MIN_CACHE_BYTES, 5));
    }

    #[test]
    fn a_damaged_word_changes_the_answer() {
        let mut c = Cache::new(1);
        let key = 1234;
        let good = c.lookup(key);
        let start = slice_start(key, c.words.len() as u64) as usize;
        c.words[start + SLICE_WORDS / 2] ^= 1;
        assert_ne!(c.lookup(key), good);
    }

    #[test]
    fn helper_values_depend_on_key_and_position() {
        assert_ne!(helper_value(1, 1), helper_value(1, 2));
        assert_ne!(helper_value(1, 1), helper_value(2, 1));
    }
}
