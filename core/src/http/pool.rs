//! Idle upstream HTTP/1.1 connections, per worker and per endpoint.
//!
//! A connection goes back only after a complete, well-framed exchange; before reuse it is checked
//! for a close (or stray bytes) from the peer, and connections idle past the cluster's idle timeout
//! are dropped. Keyed by endpoint address; TLS settings and identity join the key when TLS lands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_io::Stream;

/// Idle connections kept per endpoint per worker.
const MAX_IDLE_PER_ENDPOINT: usize = 128;

#[derive(Default)]
pub struct UpstreamPool {
    idle: HashMap<SocketAddr, Vec<(Stream, Instant)>>,
}

impl UpstreamPool {
    /// An idle connection to `addr`, if one is left. With `check`, it is first probed for a close
    /// (or stray bytes) from the peer, which costs a syscall; callers that can resend the request on
    /// a fresh connection when a pooled one turns out dead skip the probe.
    pub fn take(&mut self, addr: SocketAddr, max_idle: Duration, check: bool) -> Option<Stream> {
        let list = self.idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < max_idle && (!check || stream.is_reusable()) {
                return Some(stream);
            }
        }
        None
    }

    /// Returns a connection after a clean exchange.
    pub fn put(&mut self, addr: SocketAddr, stream: Stream) {
        let list = self.idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((stream, Instant::now()));
        }
    }

    /// Closes the idle connections to endpoints for which `keep` is false (after a reload).
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr) -> bool) {
        self.idle.retain(|addr, _| keep(addr));
    }

    /// Idle connections held, over all endpoints.
    pub fn idle_count(&self) -> usize {
        self.idle.values().map(Vec::len).sum()
    }
}
