//! Circuit breakers (DestinationRule `connectionPool`): connections, requests, pending requests and
//! retries in flight per cluster, counted over all workers together.
//!
//! The limits are the proxy's, not a core's, so the gauges are shared atomics in the cluster's
//! [`ClusterStats`], which outlive reloads (a cluster keeps its gauges while its name stays).
//! Everything counted is held by a guard that gives it back when dropped, however the request
//! or connection ends — a cancelled future, an error path, a pooled connection closed later.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use crate::stats::ClusterStats;

/// The least number of retries the retry budget always allows (Envoy's `min_retry_concurrency`).
const BUDGET_MIN_RETRIES: u32 = 3;
/// The share of active requests that may be retries at once (Envoy's `budget_percent`, 20%).
const BUDGET_DIVISOR: u32 = 5;

/// A cluster's circuit-breaker gauges.
#[derive(Debug, Default)]
pub struct Gauges {
    connections: AtomicU32,
    requests: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
}

impl Gauges {
    /// Upstream connections open or being opened.
    pub fn connections(&self) -> u32 {
        self.connections.load(Relaxed)
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Relaxed)
    }

    /// Requests waiting for a connection.
    pub fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }

    /// Retries in flight.
    pub fn retries(&self) -> u32 {
        self.retries.load(Relaxed)
    }

    /// Counts a request in flight, unless `max` already are.
    pub fn request(&self, max: u32) -> Option<Held<'_>> {
        take(&self.requests, max).then(|| Held(&self.requests))
    }

    /// Counts a request as waiting for a connection, unless `max` already do.
    pub fn wait(&self, max: u32) -> Option<Held<'_>> {
        take(&self.pending, max).then(|| Held(&self.pending))
    }

    /// Counts a retry in flight, unless `max` (or, without one, the budget: 20% of the requests
    /// in flight, at least 3) already are.
    pub fn retry(&self, max: Option<u32>) -> Option<Held<'_>> {
        let max = max.unwrap_or_else(|| (self.requests() / BUDGET_DIVISOR).max(BUDGET_MIN_RETRIES));
        take(&self.retries, max).then(|| Held(&self.retries))
    }
}

/// Adds one to `gauge` if it is below `max`.
fn take(gauge: &AtomicU32, max: u32) -> bool {
    let before = gauge.fetch_add(1, Relaxed);
    if before >= max {
        gauge.fetch_sub(1, Relaxed);
        return false;
    }
    true
}

/// One unit of a gauge, given back on drop.
#[must_use]
pub struct Held<'a>(&'a AtomicU32);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An upstream connection counted against its cluster's `maxConnections`, from before the connect
/// until the socket closes — in use or idle in a pool, on any generation.
pub struct ConnSlot {
    stats: Arc<ClusterStats>,
    worker: usize,
}

impl ConnSlot {
    /// A slot for a new connection by `worker`, unless `max` are open; counted as attempted.
    pub fn open(stats: &Arc<ClusterStats>, max: u32, worker: usize) -> Option<ConnSlot> {
        if !take(&stats.breaker.connections, max) {
            return None;
        }
        stats.slots[worker].cx_total.inc();
        Some(ConnSlot {
            stats: stats.clone(),
            worker,
        })
    }

    /// The cluster the connection counts against.
    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats.breaker.connections.fetch_sub(1, Relaxed);
        // The worker that opened the connection is the one closing it (connections never move
        // between cores), so its counter slot keeps a single writer.
        self.stats.slots[self.worker].cx_closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_and_guards_give_back() {
        let g = Gauges::default();
        let a = g.request(2).unwrap();
        let b = g.request(2).unwrap();
        assert!(g.request(2).is_none());
        assert_eq!(g.requests(), 2);
        drop(a);
        assert!(g.request(2).is_some());
        drop(b);
        assert_eq!(g.requests(), 0);
    }

    #[test]
    fn retry_budget_is_a_fifth_of_requests_at_least_three() {
        let g = Gauges::default();
        let held: Vec<_> = (0..3).map(|_| g.retry(None).unwrap()).collect();
        assert!(g.retry(None).is_none());
        let reqs: Vec<_> = (0..20).map(|_| g.request(u32::MAX).unwrap()).collect();
        // 20 in flight: a budget of 4.
        let fourth = g.retry(None).unwrap();
        assert!(g.retry(None).is_none());
        assert!(g.retry(Some(10)).is_some());
        drop((held, reqs, fourth));
        assert_eq!(g.retries(), 0);
    }

    #[test]
    fn connection_slots_count_over_owners() {
        let stats = Arc::new(ClusterStats::new("c", 1));
        let a = ConnSlot::open(&stats, 1, 0).unwrap();
        assert!(ConnSlot::open(&stats, 1, 0).is_none());
        assert_eq!(stats.breaker.connections(), 1);
        drop(a);
        assert_eq!(stats.breaker.connections(), 0);
        assert_eq!(stats.slots[0].cx_total.get(), 1);
        assert_eq!(stats.slots[0].cx_closed.get(), 1);
    }
}
