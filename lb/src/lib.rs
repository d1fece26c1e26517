//! Load balancing: picking an endpoint (or a weighted route target) per connection or request.
//!
//! This crate knows nothing of sockets or runtimes. Balancer state is per worker (each worker builds
//! its own balancers from the snapshot), so a pick touches only core-local memory: no atomics, no locks.

mod rng;
mod round_robin;
mod weighted_random;

pub use rng::Rng;
pub use round_robin::RoundRobin;
pub use weighted_random::{pick_weighted, WeightedRandom};

/// A per-worker balancer over a fixed list of weighted choices (endpoints or route targets).
///
/// `pick` returns an index into the weights it was built from, or `None` when there is nothing to pick.
#[derive(Debug, Clone)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    Random(WeightedRandom),
}

impl Balancer {
    pub fn pick(&mut self, rng: &mut Rng) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick(),
            Balancer::Random(b) => b.pick(rng),
        }
    }
}
