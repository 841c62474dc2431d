//! Hash maps keyed by small integer ids (OIDs, relation ids, origin ids), hashed with one
//! multiplication instead of SipHash.
//!
//! Why: the apply path looks up its relation map, its executor state and its
//! conflict caches several times per change; with the standard library's SipHash that
//! was about 1% of the apply process's instructions for single-row transactions
//! (`bdr-bench count-update`). The keys are ids chosen by PostgreSQL or by the peer, not
//! by an attacker who could aim at one bucket: a peer that wanted to slow its own stream
//! has simpler means, and a bad distribution costs time, never correctness.
//!
//! Invariant: used only for integer keys (`u16`, `u32`, `u64`, `usize`); other keys
//! still hash (byte by byte), just not faster than SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Fibonacci hashing's multiplier (2^64 / golden ratio).
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// One multiply per integer written.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // hashbrown takes the top 7 bits as the tag and the low bits as the bucket:
        // fold the well-mixed high half into the low one.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(K);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(K);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A `HashMap` keyed by an integer id.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A `HashSet` of integer ids.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: T) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(v)
    }

    #[test]
    fn maps_behave_as_maps() {
        let mut m: IdMap<u32, &str> = IdMap::default();
        for i in 0..10_000u32 {
            m.insert(i * 7, "x");
        }
        assert_eq!(m.len(), 10_000);
        assert!(m.contains_key(&69_993));
        assert!(!m.contains_key(&69_994));
        let s: IdSet<u16> = [1u16, 2, 2, 3].into_iter().collect();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn consecutive_ids_spread_over_buckets_and_tags() {
        // OIDs and relation ids are mostly consecutive: their low bits (the bucket) and
        // top 7 bits (hashbrown's tag) must both vary.
        let low: HashSet<u64> = (16_384u32..16_384 + 256).map(|i| hash(i) & 0xff).collect();
        let top: HashSet<u64> = (16_384u32..16_384 + 256).map(|i| hash(i) >> 57).collect();
        assert!(low.len() > 128, "low bits: {} distinct of 256", low.len());
        assert!(top.len() > 64, "top bits: {} distinct of 128", top.len());
    }

    #[test]
    fn different_widths_of_one_value_agree() {
        assert_eq!(hash(5u16), hash(5u32));
        assert_eq!(hash(5u32), hash(5u64));
    }
}
