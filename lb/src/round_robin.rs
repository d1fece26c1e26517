//! Round robin: plain rotation when weights are equal, smooth weighted round robin otherwise.

/// Smooth weighted round robin (as nginx): over any window of `sum(weights)` picks each choice gets
/// exactly its weight, interleaved rather than in bursts.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
    next: usize,
    uniform: bool,
}

impl RoundRobin {
    /// `start` offsets the rotation so that workers do not all begin with the same endpoint.
    pub fn new(weights: &[u32], start: usize) -> RoundRobin {
        let weights: Vec<i64> = weights.iter().map(|w| i64::from((*w).max(1))).collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let n = weights.len().max(1);
        RoundRobin {
            total: weights.iter().sum(),
            current: vec![0; weights.len()],
            weights,
            next: start % n,
            uniform,
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
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        let mut counts = [0; 3];
        for _ in 0..7000 {
            counts[rr.pick().unwrap()] += 1;
        }
        assert_eq!(counts, [5000, 1000, 1000]);
    }

    #[test]
    fn empty() {
        assert_eq!(RoundRobin::new(&[], 0).pick(), None);
    }
}
