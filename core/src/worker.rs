//! One worker: a monoio runtime on one core with its own listening sockets, balancers and counters.
//!
//! Nothing here is shared with other workers on the hot path: the snapshot is read-only, balancer
//! state and the random generator are core-local, and counters are this worker's own slots.

use std::cell::{Cell, RefCell};
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{Cluster, LbPolicy, Protocol, Snapshot};
use keel_lb::{Balancer, Rng, RoundRobin, WeightedRandom};
use tokio::sync::watch;

use crate::stats::Stats;
use crate::tcp_proxy;

/// A worker's view of the config and its core-local state.
pub struct Worker {
    pub id: usize,
    /// How this worker moves bytes (splice or copy).
    pub forwarding: keel_io::Forwarding,
    pub snapshot: Arc<Snapshot>,
    pub stats: Arc<Stats>,
    balancers: RefCell<Vec<Balancer>>,
    routes: Vec<Option<WeightedRandom>>,
    rng: RefCell<Rng>,
    /// Idle upstream HTTP/1.1 connections of this worker.
    pub pool: RefCell<crate::http::pool::UpstreamPool>,
    /// Idle timeouts of this worker's connections.
    pub idle: crate::idle::IdleSweep,
    active: Cell<usize>,
    last_warning: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl Worker {
    /// Builds worker `id`'s balancers from the snapshot; round robin starts at a different endpoint per worker.
    pub fn new(
        id: usize,
        snapshot: Arc<Snapshot>,
        stats: Arc<Stats>,
        forwarding: keel_io::Forwarding,
    ) -> Worker {
        let balancers = snapshot
            .clusters
            .iter()
            .map(|c| balancer_for(c, id))
            .collect();
        let routes = snapshot
            .listeners
            .iter()
            .map(|l| {
                (l.route.len() > 1).then(|| {
                    WeightedRandom::new(&l.route.iter().map(|w| w.weight).collect::<Vec<_>>())
                })
            })
            .collect();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((id as u64 + 1) << 48);
        Worker {
            id,
            forwarding,
            snapshot,
            stats,
            balancers: RefCell::new(balancers),
            routes,
            rng: RefCell::new(Rng::new(seed)),
            pool: RefCell::new(Default::default()),
            idle: Default::default(),
            active: Cell::new(0),
            last_warning: Cell::new(None),
            suppressed: Cell::new(0),
        }
    }

    /// The cluster a new connection on listener `listener` goes to (weighted when the route splits).
    pub fn pick_cluster(&self, listener: usize) -> Option<usize> {
        let route = &self.snapshot.listeners.get(listener)?.route;
        match self.routes.get(listener)? {
            None => route.first().map(|w| w.cluster),
            Some(picker) => picker
                .pick(&mut self.rng.borrow_mut())
                .map(|i| route[i].cluster),
        }
    }

    /// A weighted random choice among `weights` (route destinations); `None` when all are zero.
    pub fn pick_weighted(&self, weights: impl Iterator<Item = u32> + Clone) -> Option<usize> {
        keel_lb::pick_weighted(weights, &mut self.rng.borrow_mut())
    }

    /// The endpoint index of `cluster` for the next connection.
    pub fn pick_endpoint(&self, cluster: usize) -> Option<usize> {
        let mut balancers = self.balancers.borrow_mut();
        balancers.get_mut(cluster)?.pick(&mut self.rng.borrow_mut())
    }

    /// Connections open on this worker.
    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Counts a failed upstream connect on listener `listener` and cluster `cluster` by its kind, and
    /// logs it (rate-limited).
    pub fn upstream_connect_failed(
        &self,
        listener: usize,
        cluster: usize,
        endpoint: std::net::SocketAddr,
        e: &keel_io::ConnectError,
    ) {
        let lstats = &self.stats.listeners[listener].slots[self.id];
        let cstats = &self.stats.clusters[cluster].slots[self.id];
        cstats.connect_fail.inc();
        match e {
            keel_io::ConnectError::Refused(_) => lstats.connect_refused.inc(),
            keel_io::ConnectError::Timeout => {
                lstats.connect_timeout.inc();
                cstats.connect_timeout.inc();
            }
            keel_io::ConnectError::Other(_) => lstats.connect_error.inc(),
        }
        self.warn_upstream(
            &self.snapshot.listeners[listener].name,
            &self.snapshot.clusters[cluster].name,
            endpoint,
            e,
        );
    }

    /// Logs an upstream problem at most once a second per worker, so a dead upstream under load
    /// yields a readable log and exact counters rather than a flood.
    pub fn warn_upstream(
        &self,
        listener: &str,
        cluster: &str,
        endpoint: std::net::SocketAddr,
        what: &dyn std::fmt::Display,
    ) {
        let now = Instant::now();
        if self
            .last_warning
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed.set(self.suppressed.get() + 1);
            return;
        }
        self.last_warning.set(Some(now));
        let suppressed = self.suppressed.replace(0);
        tracing::warn!(worker = self.id, listener, cluster, %endpoint, suppressed, "upstream {what}");
    }
}

fn balancer_for(cluster: &Cluster, worker: usize) -> Balancer {
    let weights: Vec<u32> = cluster.endpoints.iter().map(|e| e.weight).collect();
    match cluster.lb {
        LbPolicy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(&weights, worker)),
        LbPolicy::Random => Balancer::Random(WeightedRandom::new(&weights)),
    }
}

/// Counts a connection as open for as long as it lives; drain waits for these to reach zero.
pub struct ActiveGuard(Rc<Worker>, usize);

impl ActiveGuard {
    pub fn new(worker: &Rc<Worker>, listener: usize) -> ActiveGuard {
        worker.active.set(worker.active.get() + 1);
        ActiveGuard(worker.clone(), listener)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        if let Some(l) = self.0.stats.listeners.get(self.1) {
            l.slots[self.0.id].closed.inc();
        }
    }
}

/// Runs worker `worker` until `shutdown` turns true, then stops accepting and returns once its
/// connections have all closed (the caller enforces the drain deadline).
///
/// `ready` is told once every listener is registered with this worker's runtime.
pub async fn run(
    worker: Rc<Worker>,
    listeners: Vec<StdListener>,
    shutdown: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<usize, String>>,
) {
    let mut accepting = Vec::new();
    for (index, std_listener) in listeners.into_iter().enumerate() {
        match keel_io::listener::Acceptor::from_std(std_listener) {
            Ok(l) => accepting.push(monoio::spawn(accept_loop(
                worker.clone(),
                index,
                l,
                shutdown.clone(),
            ))),
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "worker {}: cannot register listener: {e}",
                    worker.id
                )));
                return;
            }
        }
    }
    monoio::spawn(sweep_idle(worker.clone()));
    let _ = ready.send(Ok(worker.id));
    for task in accepting {
        task.await;
    }
    while worker.active() > 0 {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::debug!(worker = worker.id, "worker drained");
}

/// Runs the worker's idle sweep every tick, counting each connection it closes.
async fn sweep_idle(worker: Rc<Worker>) {
    loop {
        monoio::time::sleep(crate::idle::TICK).await;
        worker.idle.sweep(|entry| {
            if let Some(l) = worker.stats.listeners.get(entry.listener) {
                l.slots[worker.id].idle_timeout.inc();
            }
        });
    }
}

async fn accept_loop(
    worker: Rc<Worker>,
    index: usize,
    listener: keel_io::listener::Acceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = worker.snapshot.listeners[index].name.clone();
    let protocol = worker.snapshot.listeners[index].protocol;
    loop {
        // Wait for pending connections or for shutdown; cancelling a readiness wait is harmless.
        let stop = monoio::select! {
            r = listener.readable() => r.is_err(),
            _ = shutdown.wait_for(|draining| *draining) => true,
        };
        if stop {
            break;
        }
        // Take every connection waiting, then wait again.
        loop {
            match listener.try_accept() {
                Ok((stream, peer)) => {
                    worker.stats.per_worker[worker.id].accepted.inc();
                    match protocol {
                        Protocol::Tcp => {
                            monoio::spawn(tcp_proxy::handle(worker.clone(), index, stream, peer));
                        }
                        Protocol::Http => {
                            monoio::spawn(crate::http::proxy::serve(
                                worker.clone(),
                                index,
                                stream,
                                peer,
                            ));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning, and say so.
                    tracing::warn!(worker = worker.id, listener = %name, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
    tracing::debug!(worker = worker.id, listener = %name, "stopped accepting");
}
