//! LEAST_REQUEST: power of two choices, as Envoy does it — two candidates drawn at random (by
//! weight when weights differ), the one with fewer requests in flight (relative to its weight) wins.
//!
//! Requests in flight are counted per worker: each worker balances its own traffic, which keeps the
//! pick free of shared memory; across workers the choices stay good because every worker's traffic is
//! a fair sample of the whole.

use crate::Rng;

/// Power-of-two-choices over weighted hosts with per-host in-flight counts.
#[derive(Debug, Clone)]
pub struct LeastRequest {
    weights: Vec<u32>,
    /// Running sums of the weights, for weighted candidate draws.
    cumulative: Vec<u64>,
    active: Vec<u32>,
    uniform: bool,
}

impl LeastRequest {
    pub fn new(weights: &[u32]) -> LeastRequest {
        let weights: Vec<u32> = weights.iter().map(|w| (*w).max(1)).collect();
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += u64::from(*w);
                sum
            })
            .collect();
        LeastRequest {
            uniform: weights.windows(2).all(|w| w[0] == w[1]),
            active: vec![0; weights.len()],
            weights,
            cumulative,
        }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let n = self.weights.len();
        if self.uniform {
            return rng.below(n as u64) as usize;
        }
        let total = self.cumulative[n - 1];
        let x = rng.below(total);
        self.cumulative.partition_point(|c| *c <= x)
    }

    /// The host for the next request; call [`LeastRequest::started`] and
    /// [`LeastRequest::finished`] around it so the counts stay true.
    pub fn pick(&mut self, rng: &mut Rng) -> Option<usize> {
        let n = self.weights.len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let a = self.draw(rng);
        let mut b = self.draw(rng);
        if b == a && self.uniform {
            // Two distinct candidates when all are alike: the second from the others.
            b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
        }
        // Fewer in flight per unit of weight wins (active_a / w_a against active_b / w_b); a tie
        // goes to the first draw, so an idle cluster is balanced by weight alone.
        let load = |i: usize| u64::from(self.active[i]);
        let (wa, wb) = (u64::from(self.weights[a]), u64::from(self.weights[b]));
        Some(if load(a) * wb <= load(b) * wa { a } else { b })
    }

    /// A request to host `i` began.
    pub fn started(&mut self, i: usize) {
        if let Some(a) = self.active.get_mut(i) {
            *a = a.saturating_add(1);
        }
    }

    /// A request to host `i` ended.
    pub fn finished(&mut self, i: usize) {
        if let Some(a) = self.active.get_mut(i) {
            *a = a.saturating_sub(1);
        }
    }

    /// Requests in flight to host `i` from this worker.
    pub fn active(&self, i: usize) -> u32 {
        self.active.get(i).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_less_loaded_host() {
        let mut lr = LeastRequest::new(&[1, 1, 1, 1]);
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            lr.started(0);
            lr.started(1);
        }
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[lr.pick(&mut rng).unwrap()] += 1;
        }
        // Host 0 or 1 wins only when both candidates are loaded ones: (2/4)·(1/3) of draws.
        let loaded = counts[0] + counts[1];
        assert!((1400..2000).contains(&loaded), "{counts:?}");
        assert!(counts[2] > 3500 && counts[3] > 3500, "{counts:?}");
    }

    #[test]
    fn balances_in_flight_requests() {
        // Requests that stay open: the counts stay level.
        let mut lr = LeastRequest::new(&[1; 10]);
        let mut rng = Rng::new(3);
        for _ in 0..10_000 {
            let i = lr.pick(&mut rng).unwrap();
            lr.started(i);
        }
        let (min, max) = (0..10).fold((u32::MAX, 0), |(lo, hi), i| {
            (lo.min(lr.active(i)), hi.max(lr.active(i)))
        });
        assert!(max - min <= 3, "{min}..{max}");
    }

    #[test]
    fn honours_weights_when_idle() {
        // One request at a time (nothing in flight at each pick): picks follow the weights.
        let mut lr = LeastRequest::new(&[1, 2, 7]);
        let mut rng = Rng::new(11);
        let mut counts = [0f64; 3];
        let n = 100_000;
        for _ in 0..n {
            counts[lr.pick(&mut rng).unwrap()] += 1.0;
        }
        for (c, w) in counts.iter().zip([0.1, 0.2, 0.7]) {
            assert!((c / n as f64 - w).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn weighted_under_load_tracks_weights() {
        // Requests kept open: in-flight counts end up proportional to the weights.
        let mut lr = LeastRequest::new(&[1, 3]);
        let mut rng = Rng::new(5);
        for _ in 0..40_000 {
            let i = lr.pick(&mut rng).unwrap();
            lr.started(i);
        }
        let ratio = f64::from(lr.active(1)) / f64::from(lr.active(0));
        assert!((2.7..3.3).contains(&ratio), "{ratio}");
    }

    #[test]
    fn edge_cases() {
        let mut rng = Rng::new(1);
        assert_eq!(LeastRequest::new(&[]).pick(&mut rng), None);
        assert_eq!(LeastRequest::new(&[5]).pick(&mut rng), Some(0));
        let mut lr = LeastRequest::new(&[1, 1]);
        lr.finished(0);
        assert_eq!(lr.active(0), 0, "never below zero");
        lr.started(9);
    }
}
