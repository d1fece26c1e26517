//! An upstream connection for a request: an idle pooled one, or a new one within the cluster's
//! `maxConnections`. When all of those are open the request waits — at most
//! `http1MaxPendingRequests` requests may — for one to come free, and past that is refused
//! (503, flag UO), as Envoy's circuit breakers do.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_io::ConnectError;

use super::pool::{PoolKey, PooledConn};
use crate::breaker::ConnSlot;
use crate::generation::Generation;
use crate::worker::Worker;

/// How often a waiting request looks again when no connection of its own worker came free (a
/// slot freed by another worker wakes nobody here).
const WAIT_POLL: Duration = Duration::from_millis(5);

/// Why no connection was had.
pub enum AcquireError {
    Connect(ConnectError),
    /// `maxConnections` open and `http1MaxPendingRequests` already waiting.
    Overflow,
    /// Waited for a connection until the deadline.
    WaitTimeout,
}

/// A connection to `addr` of `cluster`, and whether it was pooled. `skip_probe`: see
/// [`super::pool::UpstreamPool::take`]. A wait for a free slot ends at `wait_until`.
pub async fn acquire(
    worker: &Worker,
    gen: &Generation,
    cluster: usize,
    addr: SocketAddr,
    skip_probe: bool,
    wait_until: Instant,
) -> Result<(PooledConn, bool), AcquireError> {
    let key = (addr, crate::upstream::pool_key(gen, cluster));
    let config = &gen.snapshot.clusters[cluster];
    let stats = &gen.clusters[cluster];
    let mut waiting = None;
    loop {
        let pooled = worker
            .pool
            .borrow_mut()
            .take(key, config.pool_idle_timeout, !skip_probe);
        if let Some(conn) = pooled {
            return Ok((conn, true));
        }
        if let Some(slot) = ConnSlot::open(stats, config.limits.max_connections, worker.id) {
            drop(waiting);
            let stream = crate::upstream::open(gen, cluster, addr)
                .await
                .map_err(AcquireError::Connect)?;
            let conn = PooledConn {
                stream,
                slot,
                requests: 0,
            };
            return Ok((conn, false));
        }
        if waiting.is_none() {
            let held = stats
                .breaker
                .wait(config.limits.max_pending_requests)
                .ok_or(AcquireError::Overflow)?;
            stats.slots[worker.id].rq_pending.inc();
            waiting = Some(held);
        }
        let now = Instant::now();
        if now >= wait_until {
            return Err(AcquireError::WaitTimeout);
        }
        let _waiter = Waiter::new(worker);
        let _ = monoio::time::timeout(
            (wait_until - now).min(WAIT_POLL),
            worker.conn_released.notified(),
        )
        .await;
    }
}

/// Hands a connection back after a complete exchange: to the pool, unless it has carried
/// `maxRequestsPerConnection` requests, or requests wait for a connection slot on another worker
/// only (then the slot is worth more free). Wakes this worker's waiting requests either way.
pub fn give_back(
    worker: &Worker,
    gen: &Generation,
    cluster: usize,
    key: PoolKey,
    mut conn: PooledConn,
) {
    conn.requests = conn.requests.saturating_add(1);
    let per_connection = gen.snapshot.clusters[cluster]
        .limits
        .max_requests_per_connection;
    let spent = per_connection != 0 && conn.requests >= per_connection;
    let wanted_elsewhere =
        conn.slot.stats().breaker.pending() > 0 && worker.conn_waiters.get() == 0;
    if !spent && !wanted_elsewhere {
        worker.pool.borrow_mut().put(key, conn);
    } else {
        drop(conn);
    }
    if worker.conn_waiters.get() > 0 {
        worker.conn_released.notify_waiters();
    }
}

/// Counts a request of this worker as waiting for a connection while it lives.
struct Waiter<'a>(&'a Worker);

impl<'a> Waiter<'a> {
    fn new(worker: &'a Worker) -> Waiter<'a> {
        worker.conn_waiters.set(worker.conn_waiters.get() + 1);
        Waiter(worker)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.conn_waiters.set(self.0.conn_waiters.get() - 1);
    }
}
