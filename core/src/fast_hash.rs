//! A multiply-rotate hasher for the small integer keys of per-request lookups.
//!
//! SipHash, std's default, is built against hash flooding by untrusted keys and costs tens of ns
//! per lookup; these maps are keyed by Keel's own fingerprints (metric series) or by HTTP/2 stream
//! ids. A peer picks its stream ids, and could space them so that their hashes share low bits,
//! but it can hold only as many at once as `http2.maxConcurrentStreams` allows (1024 by
//! default): the worst lookup then probes that many entries' control bytes, 16 at a time (the
//! high bits, which the table also compares, still differ), a bounded cost and no growth.

use std::collections::HashMap;

/// The hasher: a few cycles per integer written.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
}

/// A `HashMap` hashed by [`KeyHasher`].
pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// HTTP/2 stream ids (odd, increasing) spread over a map's buckets: no two of the first
    /// thousand share a hash.
    #[test]
    fn stream_ids_do_not_collide() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<KeyHasher>::default();
        let mut seen = std::collections::HashSet::new();
        for id in (1u32..2000).step_by(2) {
            assert!(seen.insert(build.hash_one(id)), "stream {id}");
        }
        let mut map: FastMap<u32, u32> = FastMap::default();
        for id in (1u32..2000).step_by(2) {
            map.insert(id, id * 2);
        }
        assert!((1u32..2000)
            .step_by(2)
            .all(|id| map.get(&id) == Some(&(id * 2))));
    }

    /// Ids a peer spaces to share their hashes' low bits still spread over the high bits the
    /// table compares in each probe group, so a lookup among them is not a full comparison each.
    #[test]
    fn spaced_stream_ids_keep_distinct_high_bits() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<KeyHasher>::default();
        for shift in [10u32, 16, 20] {
            let tags: std::collections::HashSet<u64> = (0..1024u32)
                .map(|k| (1 + (k << shift)) & 0x7fff_ffff)
                .map(|id| build.hash_one(id) >> 57)
                .collect();
            assert!(tags.len() >= 64, "spacing 2^{shift}: {} tags", tags.len());
        }
    }
}
