//! Load balancing: picking an endpoint (or a weighted route target) per connection or request —
//! round robin, weighted random, least request (power of two choices), and consistent hashing by
//! ring or Maglev table.
//!
//! This crate knows nothing of sockets or runtimes. Balancer state is per worker (each worker builds
//! its own balancers from the snapshot), so a pick touches only core-local memory: no atomics, no locks.

pub mod hash;
mod least_request;
pub mod maglev;
pub mod outlier;
mod peak_ewma;
pub mod ring_hash;
mod rng;
mod round_robin;
mod weighted_random;

/// Fixtures the consistent-hashing tests share: host names and request keys.
#[cfg(test)]
mod test_support {
    /// `n` endpoint names as `ip:port`.
    pub fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250))
            .collect()
    }

    /// 100,000 hashed request keys.
    pub fn keys() -> Vec<u64> {
        (0..100_000)
            .map(|i| crate::hash::hash_bytes(format!("key-{i}").as_bytes(), 0))
            .collect()
    }
}

pub use least_request::LeastRequest;
pub use maglev::Maglev;
pub use peak_ewma::PeakEwma;
pub use ring_hash::RingHash;
pub use rng::Rng;
pub use round_robin::RoundRobin;
pub use weighted_random::{pick_weighted, WeightedRandom};

/// A per-worker balancer over a fixed list of weighted choices (endpoints or route targets).
///
/// `pick` returns an index into the weights (or hosts) it was built from, or `None` when there is
/// nothing to pick.
#[derive(Debug, Clone)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    Random(WeightedRandom),
    LeastRequest(LeastRequest),
    RingHash(RingHash),
    Maglev(Maglev),
    PeakEwma(PeakEwma),
}

impl Balancer {
    /// A pick without a hash key (a consistent-hash balancer then picks at random, as Envoy does
    /// when a request has no hash key).
    pub fn pick(&mut self, rng: &mut Rng) -> Option<usize> {
        self.pick_keyed(rng, None)
    }

    /// A request (or connection) to choice `i` began: the load-aware balancers count it.
    pub fn started(&mut self, i: usize) {
        match self {
            Balancer::LeastRequest(b) => b.started(i),
            Balancer::PeakEwma(b) => b.started(i),
            _ => {}
        }
    }

    /// A request (or connection) to choice `i` ended after `rtt` (peak EWMA learns from it).
    pub fn finished(&mut self, i: usize, rtt: std::time::Duration) {
        match self {
            Balancer::LeastRequest(b) => b.finished(i),
            Balancer::PeakEwma(b) => b.finished(i, rtt),
            _ => {}
        }
    }

    /// Whether the balancer needs request durations (so callers time requests only then).
    pub fn wants_latency(&self) -> bool {
        matches!(self, Balancer::PeakEwma(_))
    }

    /// A pick for a request whose hash key (header, cookie, source address...) hashed to `key`.
    pub fn pick_keyed(&mut self, rng: &mut Rng, key: Option<u64>) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick(),
            Balancer::Random(b) => b.pick(rng),
            Balancer::LeastRequest(b) => b.pick(rng),
            Balancer::RingHash(b) => b.pick(key.unwrap_or_else(|| rng.next_u64())),
            Balancer::Maglev(b) => b.pick(key.unwrap_or_else(|| rng.next_u64())),
            Balancer::PeakEwma(b) => b.pick(rng),
        }
    }
}
