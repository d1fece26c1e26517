//! An upstream connection for a request: an idle pooled one (HTTP/1.1) or a stream on a shared one
//! (HTTP/2), or a new one within the cluster's `maxConnections`. When all of those are open the request waits — at most
//! `http1MaxPendingRequests` requests may — for one to come free, and past that is refused
//! (503, flag UO), as Envoy's circuit breakers do.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_io::ConnectError;

use super::h2::client::{ClientConn, ClientStream, ConnSettings};
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
    /// The HTTP/2 connection this request was to share failed to connect (the request that
    /// opened it reports why).
    SharedConnect,
    /// `maxConnections` open and `http1MaxPendingRequests` already waiting.
    Overflow,
    /// Waited for a connection until the deadline.
    WaitTimeout,
}

/// What a request goes upstream on.
pub(crate) enum Acquired {
    /// A whole HTTP/1.1 connection, pooled or new.
    H1(PooledConn),
    /// A stream on a shared HTTP/2 connection.
    H2(ClientStream),
}

/// A connection (HTTP/1.1) or a stream (`h2`: HTTP/2) to `addr` of `cluster`, and whether it was
/// had without a connect. `skip_probe`: see [`super::pool::UpstreamPool::take`]. A wait for a
/// free slot ends at `wait_until`.
pub(crate) async fn acquire(
    worker: &Worker,
    gen: &Generation,
    cluster: usize,
    addr: SocketAddr,
    skip_probe: bool,
    h2: bool,
    wait_until: Instant,
) -> Result<(Acquired, bool), AcquireError> {
    let key = (addr, crate::upstream::pool_key(gen, cluster));
    let config = &gen.snapshot.clusters[cluster];
    let stats = &gen.clusters[cluster];
    let mut waiting = None;
    loop {
        if h2 {
            let reserved = worker.h2_pool.borrow_mut().reserve(key);
            if let Some(stream) = reserved {
                // No longer pending: it has a stream, though maybe on a connection still being
                // opened by another request — wait for that. Once its stream limit is known, a
                // reservation beyond it looks again.
                waiting = None;
                if !stream.ready().await {
                    return Err(AcquireError::SharedConnect);
                }
                if stream.fits() {
                    return Ok((Acquired::H2(stream), true));
                }
                continue;
            }
        } else {
            let pooled = worker
                .pool
                .borrow_mut()
                .take(key, config.pool_idle_timeout, !skip_probe);
            if let Some(conn) = pooled {
                return Ok((Acquired::H1(conn), true));
            }
        }
        if let Some(slot) = ConnSlot::open(stats, config.limits.max_connections, worker.id) {
            waiting = None;
            if h2 {
                // Boxed, like the HTTP/1.1 connect below: a connect and a TLS handshake are large
                // futures, and most requests find a connection and never need them.
                match Box::pin(open_h2(worker, gen, cluster, addr, key, slot)).await? {
                    Some(opened) => return Ok(opened),
                    // The streams it allows were taken by requests that waited on it.
                    None => continue,
                }
            }
            let stream = Box::pin(crate::upstream::open(
                gen,
                cluster,
                addr,
                crate::upstream::Carries::Http1,
            ))
            .await
            .map_err(AcquireError::Connect)?;
            let conn = PooledConn {
                stream,
                slot,
                requests: 0,
            };
            return Ok((Acquired::H1(conn), false));
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
        let _ = keel_io::time::timeout(
            (wait_until - now).min(WAIT_POLL),
            worker.conn_released.notified(),
        )
        .await;
    }
}

/// Opens an HTTP/2 connection, pooled at once so that requests arriving meanwhile reserve
/// streams on it instead of opening connections of their own. `None`: it is up, but the requests
/// that waited on it took every stream its peer allows.
async fn open_h2(
    worker: &Worker,
    gen: &Generation,
    cluster: usize,
    addr: SocketAddr,
    key: PoolKey,
    slot: ConnSlot,
) -> Result<Option<(Acquired, bool)>, AcquireError> {
    let config = &gen.snapshot.clusters[cluster];
    let settings = ConnSettings {
        limits: gen.snapshot.proxy.http2,
        max_concurrent_streams: config.limits.max_concurrent_streams,
        max_requests_per_connection: config.limits.max_requests_per_connection,
        idle_timeout: config.pool_idle_timeout,
        tls: config.tls.is_some(),
    };
    let conn = ClientConn::new(settings, slot, worker.conn_released.clone(), addr);
    let stream = worker.h2_pool.borrow_mut().insert(key, conn.clone());
    // Should this request go away while connecting, the others waiting on it are told.
    let mut failed_unless_started = FailUnlessStarted(Some(conn.clone()));
    match crate::upstream::open(gen, cluster, addr, crate::upstream::Carries::Http2).await {
        Ok(transport) => {
            conn.start(transport);
            // The peer's SETTINGS must come within the connect timeout too.
            match keel_io::time::timeout(config.connect_timeout, stream.ready()).await {
                Ok(true) if stream.fits() => {
                    failed_unless_started.0 = None;
                    Ok(Some((Acquired::H2(stream), false)))
                }
                Ok(true) if stream.peer_allows_none() => Err(AcquireError::Connect(
                    ConnectError::Other(std::io::Error::other("the HTTP/2 peer allows no stream")),
                )),
                Ok(true) => {
                    failed_unless_started.0 = None;
                    Ok(None)
                }
                Ok(false) => Err(AcquireError::Connect(ConnectError::Other(
                    std::io::Error::other("HTTP/2 connection closed before its SETTINGS"),
                ))),
                Err(_) => {
                    stream.fail_connection();
                    Err(AcquireError::Connect(ConnectError::Timeout))
                }
            }
        }
        Err(e) => Err(AcquireError::Connect(e)),
    }
}

/// Fails a connection being opened when the request opening it stops before it is up.
struct FailUnlessStarted(Option<std::rc::Rc<ClientConn>>);

impl Drop for FailUnlessStarted {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fail();
        }
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
