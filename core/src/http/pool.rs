//! Idle upstream HTTP/1.1 connections, per worker and per endpoint.
//!
//! A connection goes back only after a complete, well-framed exchange; before reuse it is checked
//! for a close (or stray bytes) from the peer, and connections idle past the cluster's idle timeout
//! are dropped. Keyed by endpoint address and TLS context (settings and identity), so a connection
//! is only ever reused by requests that would have made the same one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_tls::Transport;

use crate::breaker::ConnSlot;

/// An endpoint and the cluster and TLS context connections to it were made for (see
/// [`crate::upstream::pool_key`]).
pub type PoolKey = (SocketAddr, u64);

/// Idle connections kept per endpoint per worker.
const MAX_IDLE_PER_ENDPOINT: usize = 128;

/// An upstream HTTP connection, with the circuit-breaker slot it holds while open and the number
/// of requests it has carried (for `maxRequestsPerConnection`).
pub struct PooledConn {
    pub stream: Transport,
    pub slot: ConnSlot,
    pub requests: u32,
}

#[derive(Default)]
pub struct UpstreamPool {
    idle: HashMap<PoolKey, Vec<(PooledConn, Instant)>>,
}

impl UpstreamPool {
    /// An idle connection for `key`, if one is left. With `check`, it is first probed for a close
    /// (or stray bytes) from the peer, which costs a syscall; callers that can resend the request on
    /// a fresh connection when a pooled one turns out dead skip the probe.
    pub fn take(&mut self, key: PoolKey, max_idle: Duration, check: bool) -> Option<PooledConn> {
        let list = self.idle.get_mut(&key)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < max_idle && (!check || conn.stream.is_reusable()) {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection after a clean exchange.
    pub fn put(&mut self, key: PoolKey, conn: PooledConn) {
        let list = self.idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((conn, Instant::now()));
        }
    }

    /// Closes idle connections of clusters whose requests wait for a connection slot
    /// (`maxConnections`), so that a slot held idle on this core serves a request waiting on another.
    pub fn release_for_waiters(&mut self) {
        for list in self.idle.values_mut() {
            list.retain(|(c, _)| c.slot.stats().breaker.pending() == 0);
        }
    }

    /// Closes the idle connections to endpoints for which `keep` is false (after a reload).
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr) -> bool) {
        self.idle.retain(|(addr, _), _| keep(addr));
    }

    /// Idle connections held, over all endpoints.
    pub fn idle_count(&self) -> usize {
        self.idle.values().map(Vec::len).sum()
    }
}
