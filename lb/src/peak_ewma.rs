//! PEAK_EWMA (Keel's, by a DestinationRule annotation): power of two choices by expected latency —
//! each host's cost is a peak-sensitive moving average of its response times, times its requests in
//! flight plus one, over its weight (Finagle's and Linkerd's peak EWMA). A host that turns slow is
//! avoided at once (the peak is taken as is); one that recovers wins traffic back as the average
//! decays (time constant 10 s). Per worker, like least request: no shared state on the pick path.

use std::time::{Duration, Instant};

use crate::Rng;

/// How fast old latencies are forgotten.
const DECAY: Duration = Duration::from_secs(10);
/// The cost of a host nothing is known about yet: a little more than a fast local hop, so new hosts
/// get tried without being flooded.
const INITIAL_NS: f64 = 1_000_000.0;

#[derive(Debug, Clone)]
struct Host {
    weight: f64,
    ewma_ns: f64,
    updated: Option<Instant>,
    active: u32,
}

/// Power-of-two-choices by peak-EWMA latency × load.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    hosts: Vec<Host>,
}

impl PeakEwma {
    pub fn new(weights: &[u32]) -> PeakEwma {
        PeakEwma {
            hosts: weights
                .iter()
                .map(|w| Host {
                    weight: f64::from((*w).max(1)),
                    ewma_ns: INITIAL_NS,
                    updated: None,
                    active: 0,
                })
                .collect(),
        }
    }

    fn cost(&self, i: usize, now: Instant) -> f64 {
        let h = &self.hosts[i];
        // The average decays toward zero while nothing is heard, so an idle slow host is retried.
        // e^-x by a rational approximation (1 / (1 + x + x²/2)): close enough to rank hosts, and
        // a pick stays cheap.
        let ewma = match h.updated {
            Some(t) => {
                let x = now.saturating_duration_since(t).as_secs_f64() / DECAY.as_secs_f64();
                h.ewma_ns / (1.0 + x + 0.5 * x * x)
            }
            None => h.ewma_ns,
        };
        ewma * f64::from(h.active + 1) / h.weight
    }

    /// The host for the next request (two distinct random candidates, the cheaper wins).
    pub fn pick(&mut self, rng: &mut Rng) -> Option<usize> {
        let n = self.hosts.len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let a = rng.below(n as u64) as usize;
        let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
        let now = Instant::now();
        Some(if self.cost(a, now) <= self.cost(b, now) {
            a
        } else {
            b
        })
    }

    pub fn started(&mut self, i: usize) {
        if let Some(h) = self.hosts.get_mut(i) {
            h.active = h.active.saturating_add(1);
        }
    }

    /// A request to host `i` ended after `rtt`.
    pub fn finished(&mut self, i: usize, rtt: Duration) {
        let Some(h) = self.hosts.get_mut(i) else {
            return;
        };
        h.active = h.active.saturating_sub(1);
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        h.ewma_ns = match h.updated {
            Some(t) if rtt <= h.ewma_ns => {
                let w =
                    (-now.saturating_duration_since(t).as_secs_f64() / DECAY.as_secs_f64()).exp();
                h.ewma_ns * w + rtt * (1.0 - w)
            }
            // A peak (or the first sample) is taken as is.
            _ => rtt,
        };
        h.updated = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_faster_host_and_the_less_loaded() {
        let mut b = PeakEwma::new(&[1, 1, 1]);
        for _ in 0..3 {
            b.started(0);
            b.finished(0, Duration::from_millis(100));
            b.started(1);
            b.finished(1, Duration::from_micros(200));
            b.started(2);
            b.finished(2, Duration::from_micros(200));
        }
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[b.pick(&mut rng).unwrap()] += 1;
        }
        assert_eq!(
            counts[0], 0,
            "the slow host never beats a fast one: {counts:?}"
        );
        // Load counts too: with many requests in flight on host 1, host 2 wins.
        for _ in 0..50 {
            b.started(1);
        }
        let mut rng = Rng::new(9);
        let picks: Vec<usize> = (0..300).filter_map(|_| b.pick(&mut rng)).collect();
        assert!(
            picks.iter().filter(|p| **p == 2).count() > picks.iter().filter(|p| **p == 1).count()
        );
    }

    #[test]
    fn a_peak_is_felt_at_once() {
        let mut b = PeakEwma::new(&[1, 1]);
        b.started(0);
        b.finished(0, Duration::from_micros(100));
        b.started(1);
        b.finished(1, Duration::from_micros(100));
        b.started(0);
        b.finished(0, Duration::from_secs(1));
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| b.pick(&mut rng) == Some(1)));
    }
}
