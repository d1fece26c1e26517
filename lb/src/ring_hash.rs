//! Consistent hashing on a ring (`consistentHash.ringHash`, Envoy's ring hash): each host owns
//! points on a 64-bit ring in proportion to its weight, and a key goes to the first point at or
//! after its hash. Adding a host moves only the keys that land on its new points; removing one moves
//! only its own keys.

use crate::hash::hash_bytes;

/// Envoy's and Istio's default `minimumRingSize`.
pub const DEFAULT_MIN_RING_SIZE: usize = 1024;
/// Envoy's default maximum ring size: bounds memory (16 bytes per point) whatever the weights.
pub const MAX_RING_SIZE: usize = 8 * 1024 * 1024;

/// A built ring: points sorted by hash, each naming a host index.
#[derive(Debug, Clone)]
pub struct RingHash {
    points: Vec<(u64, u32)>,
}

impl RingHash {
    /// A ring over `hosts` (a stable name — e.g. `ip:port` — and a weight each) with at least
    /// `min_ring_size` points (up to twice that; capped at [`MAX_RING_SIZE`]). A host's points depend only on its
    /// name, so every worker and every process builds the same ring.
    pub fn new(hosts: &[(&str, u32)], min_ring_size: usize) -> RingHash {
        let total: u64 = hosts.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
        if total == 0 {
            return RingHash { points: Vec::new() };
        }
        // Points per unit of weight: enough for `min_ring_size` in all, rounded up to a power of
        // two. A host's point count then depends on its own weight and, only through that
        // rounding, on the others: adding or removing a host leaves everyone else's points alone
        // (and so moves only the keys it gains or owned) unless the total weight crosses a
        // doubling. Envoy scales to the exact ring size instead, which shifts every host's points
        // on each change. The ring holds between one and two times the minimum.
        let min_ring = min_ring_size.clamp(1, MAX_RING_SIZE) as u64;
        let per_weight = min_ring
            .div_ceil(total)
            .next_power_of_two()
            .min((MAX_RING_SIZE as u64 / total).max(1));
        let mut points = Vec::with_capacity((per_weight * total) as usize);
        let mut key = Vec::with_capacity(64);
        for (i, (name, w)) in hosts.iter().enumerate() {
            let count = per_weight * u64::from((*w).max(1));
            for n in 0..count {
                key.clear();
                key.extend_from_slice(name.as_bytes());
                key.push(b'_');
                let _ = std::io::Write::write_fmt(&mut key, format_args!("{n}"));
                points.push((hash_bytes(&key, 0), i as u32));
            }
        }
        points.sort_unstable();
        RingHash { points }
    }

    /// The host for a key hashed to `hash` (see [`crate::hash::hash_bytes`]).
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(h, _)| *h < hash);
        let (_, host) = self.points[if i == self.points.len() { 0 } else { i }];
        Some(host as usize)
    }

    /// Points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{keys, names};

    fn ring(names: &[String]) -> RingHash {
        let hosts: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        RingHash::new(&hosts, DEFAULT_MIN_RING_SIZE)
    }

    #[test]
    fn adding_a_host_moves_about_one_in_n_plus_one_keys_all_to_it() {
        let before_names = names(10);
        let mut after_names = before_names.clone();
        after_names.push("10.9.9.9:8080".into());
        let (before, after) = (ring(&before_names), ring(&after_names));
        let keys = keys();
        let mut moved = 0;
        for k in &keys {
            let (a, b) = (before.pick(*k).unwrap(), after.pick(*k).unwrap());
            if a != b {
                moved += 1;
                assert_eq!(b, 10, "a moved key goes to the new host");
            }
        }
        let share = moved as f64 / keys.len() as f64;
        assert!((share - 1.0 / 11.0).abs() < 0.03, "{share}");
    }

    #[test]
    fn removing_a_host_moves_only_its_keys() {
        let before_names = names(10);
        let mut after_names = before_names.clone();
        after_names.remove(3);
        let (before, after) = (ring(&before_names), ring(&after_names));
        for k in keys() {
            let a = before.pick(k).unwrap();
            let b = after.pick(k).unwrap();
            let b_name = &after_names[b];
            if a != 3 {
                assert_eq!(&before_names[a], b_name, "only host 3's keys move");
            }
        }
    }

    #[test]
    fn weights_are_honoured() {
        let hosts = [("a:1", 1), ("b:1", 2), ("c:1", 7)];
        let ring = RingHash::new(&hosts, DEFAULT_MIN_RING_SIZE);
        let mut counts = [0f64; 3];
        let keys = keys();
        for k in &keys {
            counts[ring.pick(*k).unwrap()] += 1.0;
        }
        for (c, w) in counts.iter().zip([0.1, 0.2, 0.7]) {
            assert!((c / keys.len() as f64 - w).abs() < 0.03, "{counts:?}");
        }
        assert!(ring.len() >= DEFAULT_MIN_RING_SIZE);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(RingHash::new(&[], 1024).pick(5), None);
        assert_eq!(RingHash::new(&[("a", 1)], 1024).pick(5), Some(0));
    }
}
