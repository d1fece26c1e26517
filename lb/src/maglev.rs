//! Consistent hashing with a Maglev lookup table (`consistentHash.maglev`): a key's host is one
//! array read, and the table is rebuilt from the hosts' names, so every worker and process agrees.
//! Adding or removing a host moves about 1/N of the keys (Maglev trades exact minimal disruption
//! for an O(1) lookup and even spread).

use crate::hash::hash_bytes;

/// Istio's and Envoy's default `tableSize` (a prime).
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// A built Maglev table.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
}

/// Whether `n` is prime (the table size must be, for every host's permutation to visit every slot).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

impl Maglev {
    /// A table of `size` slots (a prime) over `hosts` (stable name, weight). Heavier hosts fill
    /// proportionally more slots: a host of the largest weight takes a slot every round, one of a
    /// third of it every third round.
    pub fn new(hosts: &[(&str, u32)], size: usize) -> Result<Maglev, String> {
        if !is_prime(size) {
            return Err(format!("Maglev table size {size} is not a prime"));
        }
        if hosts.is_empty() {
            return Ok(Maglev { table: Vec::new() });
        }
        let m = size as u64;
        struct Entry {
            offset: u64,
            skip: u64,
            next: u64,
            weight: u64,
            credit: u64,
        }
        let mut entries: Vec<Entry> = hosts
            .iter()
            .map(|(name, w)| Entry {
                offset: hash_bytes(name.as_bytes(), 1) % m,
                skip: hash_bytes(name.as_bytes(), 2) % (m - 1) + 1,
                next: 0,
                weight: u64::from((*w).max(1)),
                credit: 0,
            })
            .collect();
        let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        while filled < size {
            for (i, e) in entries.iter_mut().enumerate() {
                e.credit += e.weight;
                if e.credit < max_weight {
                    continue;
                }
                e.credit -= max_weight;
                // The host's next free slot in its own permutation of the table.
                let mut slot = ((e.offset + e.next * e.skip) % m) as usize;
                while table[slot] != u32::MAX {
                    e.next += 1;
                    slot = ((e.offset + e.next * e.skip) % m) as usize;
                }
                table[slot] = i as u32;
                e.next += 1;
                filled += 1;
                if filled == size {
                    break;
                }
            }
        }
        Ok(Maglev { table })
    }

    /// The host for a key hashed to `hash`.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{keys, names};

    fn table(names: &[String]) -> Maglev {
        let hosts: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        Maglev::new(&hosts, DEFAULT_TABLE_SIZE).unwrap()
    }

    #[test]
    fn adding_a_host_moves_about_one_in_n_plus_one_keys() {
        let before_names = names(10);
        let mut after_names = before_names.clone();
        after_names.push("10.9.9.9:8080".into());
        let (before, after) = (table(&before_names), table(&after_names));
        let keys = keys();
        let moved = keys
            .iter()
            .filter(|k| before.pick(**k) != after.pick(**k))
            .count();
        let to_new = keys.iter().filter(|k| after.pick(**k) == Some(10)).count();
        let share = moved as f64 / keys.len() as f64;
        assert!(share < 1.0 / 11.0 + 0.04, "moved {share}");
        assert!((to_new as f64 / keys.len() as f64 - 1.0 / 11.0).abs() < 0.01);
    }

    #[test]
    fn removing_a_host_moves_its_keys_and_few_others() {
        let before_names = names(10);
        let mut after_names = before_names.clone();
        after_names.remove(3);
        let (before, after) = (table(&before_names), table(&after_names));
        let keys = keys();
        let mut others_moved = 0;
        for k in &keys {
            let a = before.pick(*k).unwrap();
            let b = after.pick(*k).unwrap();
            if a != 3 && before_names[a] != after_names[b] {
                others_moved += 1;
            }
        }
        // Maglev's known extra disruption is a few percent of the table at this size.
        assert!(
            (others_moved as f64 / keys.len() as f64) < 0.04,
            "{others_moved} other keys moved"
        );
    }

    #[test]
    fn spread_and_weights() {
        let t = table(&names(100));
        let mut counts = vec![0u32; 100];
        for slot in &t.table {
            counts[*slot as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 2, "slots per host {lo}..{hi}");
        let hosts = [("a:1", 1), ("b:1", 2), ("c:1", 7)];
        let t = Maglev::new(&hosts, DEFAULT_TABLE_SIZE).unwrap();
        let mut counts = [0f64; 3];
        for slot in &t.table {
            counts[*slot as usize] += 1.0;
        }
        for (c, w) in counts.iter().zip([0.1, 0.2, 0.7]) {
            assert!(
                (c / DEFAULT_TABLE_SIZE as f64 - w).abs() < 0.01,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn rejects_a_size_that_is_not_prime() {
        assert!(Maglev::new(&[("a", 1)], 65536).is_err());
        assert!(is_prime(65537) && is_prime(251) && !is_prime(1) && !is_prime(91));
        assert_eq!(Maglev::new(&[], 7).unwrap().pick(3), None);
    }
}
