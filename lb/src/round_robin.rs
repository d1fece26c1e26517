//! Round robin: plain rotation when weights are equal; with weights, a precomputed smooth schedule
//! (one array read per pick), or smooth weighted round robin computed live when the schedule would
//! be too long to keep.

/// Longest weighted schedule kept (entries of 4 bytes): weights are reduced by their gcd first, so
/// only large, coprime weights exceed it.
const MAX_SCHEDULE: u64 = 16 * 1024;

/// Weighted round robin: over every `sum(weights)` picks (weights divided by their gcd) each choice
/// gets exactly its weight, interleaved rather than in bursts.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
    next: usize,
    uniform: bool,
    /// One full cycle of picks, when weights differ and it fits in [`MAX_SCHEDULE`].
    schedule: Vec<u32>,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One cycle of a smooth weighted schedule: choice `i`'s k-th turn (k = 1..=w_i) is due at
/// `(k - 1/2) / w_i` of the cycle, and turns are taken in order of due time (ties by index), so
/// each choice's turns are spread evenly over the cycle. O(total · log n) to build.
fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let due = |k: u64, w: u64| ((2 * k - 1) as f64 / (2 * w) as f64).to_bits();
    let mut heap: BinaryHeap<Reverse<(u64, usize, u64)>> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| Reverse((due(1, *w), i, 1)))
        .collect();
    let total: u64 = weights.iter().sum();
    let mut out = Vec::with_capacity(total as usize);
    while let Some(Reverse((_, i, k))) = heap.pop() {
        out.push(i as u32);
        if k < weights[i] {
            heap.push(Reverse((due(k + 1, weights[i]), i, k + 1)));
        }
    }
    out
}

impl RoundRobin {
    /// `start` offsets the rotation so that workers do not all begin with the same endpoint.
    pub fn new(weights: &[u32], start: usize) -> RoundRobin {
        let weights: Vec<i64> = weights.iter().map(|w| i64::from((*w).max(1))).collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let n = weights.len().max(1);
        let divisor = weights.iter().fold(0, |g, w| gcd(g, *w as u64)).max(1);
        let reduced: Vec<u64> = weights.iter().map(|w| *w as u64 / divisor).collect();
        let cycle: u64 = reduced.iter().sum();
        let schedule = if !uniform && cycle <= MAX_SCHEDULE {
            smooth_schedule(&reduced)
        } else {
            Vec::new()
        };
        let next = if schedule.is_empty() {
            start % n
        } else {
            // Workers start at different points of the cycle.
            (start * schedule.len() / n) % schedule.len()
        };
        RoundRobin {
            total: weights.iter().sum(),
            current: vec![0; weights.len()],
            weights,
            next,
            uniform,
            schedule,
        }
    }

    pub fn pick(&mut self) -> Option<usize> {
        if self.weights.is_empty() {
            return None;
        }
        if self.uniform {
            let i = self.next;
            self.next = if i + 1 == self.weights.len() {
                0
            } else {
                i + 1
            };
            return Some(i);
        }
        if !self.schedule.is_empty() {
            let i = self.schedule[self.next];
            self.next = if self.next + 1 == self.schedule.len() {
                0
            } else {
                self.next + 1
            };
            return Some(i as usize);
        }
        // Smooth weighted round robin (as nginx), live: O(n) per pick, for huge coprime weights.
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates() {
        let mut rr = RoundRobin::new(&[1, 1, 1], 1);
        let picks: Vec<_> = (0..6).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn smooth_weights() {
        let mut rr = RoundRobin::new(&[5, 1, 1], 0);
        let picks: Vec<_> = (0..7).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(
            picks,
            [0, 0, 0, 1, 2, 0, 0],
            "light choices in the middle, not in a burst"
        );
        let mut counts = [0; 3];
        for _ in 0..7000 {
            counts[rr.pick().unwrap()] += 1;
        }
        assert_eq!(counts, [5000, 1000, 1000]);
        // Weights with a common divisor cycle as their reduced form.
        let mut rr = RoundRobin::new(&[200, 100], 0);
        let picks: Vec<_> = (0..6).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn exact_counts_in_every_cycle_for_many_weights() {
        let weights: Vec<u32> = (0..1000).map(|i| 1 + i % 7).collect();
        let total: u32 = weights.iter().sum();
        let mut rr = RoundRobin::new(&weights, 3);
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..total {
            counts[rr.pick().unwrap()] += 1;
        }
        assert_eq!(counts, weights);
    }

    #[test]
    fn huge_coprime_weights_fall_back_to_live_smooth_round_robin() {
        let mut rr = RoundRobin::new(&[100_003, 99_991], 0);
        let mut counts = [0u32; 2];
        for _ in 0..(100_003 + 99_991) {
            counts[rr.pick().unwrap()] += 1;
        }
        assert_eq!(counts, [100_003, 99_991]);
    }

    #[test]
    fn empty() {
        assert_eq!(RoundRobin::new(&[], 0).pick(), None);
    }
}
