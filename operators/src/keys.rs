//! Row keys from strings: img2dataset writes `key = "000000123"`, webdataset names samples
//! `shard/000123`, and sources emit an `i64` key. All-digit strings are their number; any other
//! string is a stable 63-bit hash of its UTF-8 bytes (XXH3-64 with seed 0, top bit cleared), the
//! same on every machine and release. A source keeps a [`KeyHasher`] to count collisions.

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The key of a string: its value when it is all ASCII digits and fits in 63 bits, else
/// [`hash_key`] of it.
///
/// ```
/// use latentflow_operators::keys::key_of;
/// assert_eq!(key_of("000000123"), 123);
/// assert_eq!(key_of("a/b/000123"), latentflow_operators::keys::hash_key("a/b/000123"));
/// assert!(key_of("a/b/000123") >= 0);
/// ```
pub fn key_of(text: &str) -> i64 {
    digits_value(text).unwrap_or_else(|| hash_key(text))
}

/// The value of an all-digit string that fits in an `i64` (`None` otherwise).
fn digits_value(text: &str) -> Option<i64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok()
}

/// XXH3-64 (seed 0) of the UTF-8 bytes with the top bit cleared: a non-negative `i64`.
///
/// ```
/// // Stable: this value is part of the format (checkpoints and reject logs name keys).
/// assert_eq!(latentflow_operators::keys::hash_key("cat"), 0x4254_8A8A_111C_54EE);
/// ```
pub fn hash_key(text: &str) -> i64 {
    (xxh3_64(text.as_bytes()) & (i64::MAX as u64)) as i64
}

/// Turns string keys into `i64` keys and notices collisions: two different strings that hash to
/// the same key. It remembers a second, independent 64-bit hash per hashed key (16 bytes per
/// distinct hashed key; all-digit keys cost nothing).
#[derive(Debug, Default)]
pub struct KeyHasher {
    seen: HashMap<i64, u64>,
    collisions: u64,
}

impl KeyHasher {
    /// The key of `text` ([`key_of`]), noting a collision when another string had it.
    ///
    /// ```
    /// let mut keys = latentflow_operators::keys::KeyHasher::default();
    /// assert_eq!(keys.key("42"), 42);
    /// let k = keys.key("sample-a");
    /// assert_eq!(keys.key("sample-a"), k); // the same string again is no collision
    /// assert_eq!(keys.take_collisions(), 0);
    /// ```
    pub fn key(&mut self, text: &str) -> i64 {
        if let Some(value) = digits_value(text) {
            return value;
        }
        let key = hash_key(text);
        let check = xxh3_64_with_seed(text.as_bytes(), 0x6C61_7465_6E74);
        if *self.seen.entry(key).or_insert(check) != check {
            self.collisions += 1;
        }
        key
    }

    /// Collisions seen since the last call (for [`OpContext::count`](latentflow_engine::OpContext::count)).
    pub fn take_collisions(&mut self) -> u64 {
        std::mem::take(&mut self.collisions)
    }

    /// Records a collision as if two strings had met (for tests of the counting path).
    #[cfg(test)]
    fn force(&mut self, key: i64) {
        self.seen.insert(key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_parse_and_other_strings_hash() {
        assert_eq!(key_of("0"), 0);
        assert_eq!(key_of("000000123"), 123);
        assert_eq!(key_of("9223372036854775807"), i64::MAX);
        // Too big for an i64, signed, spaced or empty: hashed.
        for text in ["9223372036854775808", "-5", " 5", "", "00012a"] {
            assert_eq!(key_of(text), hash_key(text), "{text:?}");
            assert!(key_of(text) >= 0);
        }
        assert_ne!(hash_key("a"), hash_key("b"));
    }

    #[test]
    fn collisions_are_counted() {
        let mut keys = KeyHasher::default();
        let k = hash_key("x/1");
        keys.force(k);
        assert_eq!(keys.key("x/1"), k);
        assert_eq!(keys.take_collisions(), 1);
        assert_eq!(keys.take_collisions(), 0);
    }
}
