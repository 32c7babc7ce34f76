//! A stable hash for seeds and cache file names.

/// FNV-1a, 64 bit: a stable hash (std's `DefaultHasher` may change between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}
