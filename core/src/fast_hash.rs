//! A multiply-rotate hasher for the small integer keys of per-request lookups.
//!
//! SipHash, std's default, is built against hash flooding by untrusted keys and costs tens of ns
//! per lookup; these maps are keyed by Keel's own fingerprints (metric series) or by HTTP/2 stream
//! ids, which a peer picks but can hold only as many of at once as its concurrent-stream limit
//! allows, so a collision costs at most a scan of that many entries.

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
}
