//! A fast, well-mixed 64-bit hash for consistent hashing: host names on the ring and in the Maglev
//! table, and request keys (a header value, a cookie, a source address).
//!
//! Not cryptographic, and not meant to be: placement must be stable across workers, processes and
//! restarts (so it never depends on a random seed), and spread keys evenly.

const P1: u64 = 0x9E37_79B9_7F4A_7C15;
const P2: u64 = 0xBF58_476D_1CE4_E5B9;
const P3: u64 = 0x94D0_49BB_1331_11EB;

/// splitmix64's finalizer: every input bit affects every output bit.
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(P2);
    x ^= x >> 27;
    x = x.wrapping_mul(P3);
    x ^ (x >> 31)
}

/// Hashes `bytes` with `seed` (different seeds give independent hashes of the same bytes).
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = mix(seed ^ P1 ^ (bytes.len() as u64).wrapping_mul(P2));
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = mix(h ^ v).wrapping_add(P1);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        h = mix(h ^ u64::from_le_bytes(tail) ^ P3);
    }
    mix(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_seeded() {
        assert_eq!(hash_bytes(b"10.0.0.1:80", 0), hash_bytes(b"10.0.0.1:80", 0));
        assert_ne!(hash_bytes(b"10.0.0.1:80", 0), hash_bytes(b"10.0.0.1:80", 1));
        assert_ne!(hash_bytes(b"", 0), hash_bytes(b"\0", 0));
        assert_ne!(hash_bytes(b"abcdefgh", 0), hash_bytes(b"abcdefgh\0", 0));
    }

    #[test]
    fn spreads_sequential_keys() {
        // 64k keys "user-N" into 64 buckets: each within 15% of the mean.
        let mut buckets = [0u32; 64];
        for i in 0..65536 {
            buckets[(hash_bytes(format!("user-{i}").as_bytes(), 0) % 64) as usize] += 1;
        }
        for b in buckets {
            assert!((870..=1180).contains(&b), "{buckets:?}");
        }
    }
}
