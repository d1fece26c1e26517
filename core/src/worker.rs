//! One worker: a monoio runtime on one core with its own listening sockets, balancers and counters.
//!
//! Nothing here is shared with other workers on the hot path: the config generation is read-only,
//! balancer state and the random generator are core-local, and counters are this worker's own
//! slots. The process talks to a worker only through its [`Control`] channel: to swap in a new
//! config (prepare, then commit or abort) and to drain listeners.

use std::cell::{Cell, RefCell, RefMut};
use std::net::TcpListener as StdListener;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_config::{Protocol, Snapshot};
use keel_lb::Rng;
use keel_tls::Transport;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::generation::{Generation, ListenerState};
use crate::stats::{CounterTable, ListenerCounters, Stats};
use crate::tcp_proxy;

/// Sockets handed to a worker: each with the name of the listener it belongs to.
pub type NamedSockets = Vec<(String, StdListener)>;

/// Which listeners a drain covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainScope {
    /// Listeners facing the mesh (SIGTERM: the app may still need its outbound ones).
    Inbound,
    /// Every listener (binary upgrade, `/drain_listeners`).
    All,
}

/// What the process asks of a worker.
pub enum Control {
    /// Build a generation for `snapshot` and register `sockets` (its new listeners), without
    /// serving them yet; reply whether that worked.
    Prepare {
        snapshot: Arc<Snapshot>,
        tls: Arc<keel_tls::TlsContexts>,
        table: Arc<CounterTable>,
        sockets: NamedSockets,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Serve the prepared generation: new connections and requests use it, new listeners accept,
    /// removed listeners drain.
    Commit {
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Forget the prepared generation; its sockets close.
    Abort,
    /// Stop accepting on the listeners in `scope` and let their connections finish.
    Drain {
        scope: DrainScope,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// Copies of the listening sockets still accepting, for a successor process.
    Export {
        reply: mpsc::Sender<Result<Vec<(String, OwnedFd)>, String>>,
    },
}

/// A worker's core-local state, and its current config generation.
pub struct Worker {
    pub id: usize,
    /// How this worker moves bytes (splice or copy).
    pub forwarding: keel_io::Forwarding,
    pub stats: Arc<Stats>,
    current: RefCell<Rc<Generation>>,
    rng: RefCell<Rng>,
    /// Idle upstream HTTP/1.1 connections of this worker.
    pub pool: RefCell<crate::http::pool::UpstreamPool>,
    /// Upstream HTTP/2 connections of this worker, shared by its requests.
    pub h2_pool: RefCell<crate::http::h2::client::H2Pool>,
    /// Woken when this worker gives an upstream connection back or closes one (or an HTTP/2
    /// stream ends), for requests waiting for a connection under `maxConnections`.
    pub conn_released: Rc<tokio::sync::Notify>,
    /// Requests of this worker waiting for a connection.
    pub conn_waiters: Cell<u32>,
    /// Mirrored requests in flight on this worker.
    pub mirrors_in_flight: Cell<u32>,
    /// Access log lines rendered by this worker, on their way to the writer thread.
    pub access: crate::access_log::WorkerLog,
    /// This worker's Istio metric series.
    pub metrics: crate::istio_metrics::WorkerMetrics,
    /// Idle timeouts of this worker's connections.
    pub idle: crate::idle::IdleSweep,
    active: Cell<usize>,
    /// Listening sockets accepting now, with their listener (for a handover to a successor).
    listening: RefCell<Vec<(Rc<ListenerState>, RawFd)>>,
    last_warning: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl Worker {
    /// Worker `id` serving `snapshot` with the counters of `table`.
    pub fn new(
        id: usize,
        snapshot: Arc<Snapshot>,
        tls: Arc<keel_tls::TlsContexts>,
        table: &CounterTable,
        stats: Arc<Stats>,
        forwarding: keel_io::Forwarding,
    ) -> Worker {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((id as u64 + 1) << 48);
        Worker {
            id,
            forwarding,
            current: RefCell::new(Rc::new(Generation::new(id, snapshot, tls, table, None))),
            stats,
            rng: RefCell::new(Rng::new(seed)),
            pool: RefCell::new(Default::default()),
            h2_pool: RefCell::new(Default::default()),
            conn_released: Rc::new(tokio::sync::Notify::new()),
            conn_waiters: Cell::new(0),
            mirrors_in_flight: Cell::new(0),
            access: Default::default(),
            metrics: Default::default(),
            idle: Default::default(),
            active: Cell::new(0),
            listening: RefCell::new(Vec::new()),
            last_warning: Cell::new(None),
            suppressed: Cell::new(0),
        }
    }

    /// The config generation new connections and requests use.
    pub fn current(&self) -> Rc<Generation> {
        self.current.borrow().clone()
    }

    /// The worker's random generator (weighted picks, jitter).
    pub fn rng(&self) -> RefMut<'_, Rng> {
        self.rng.borrow_mut()
    }

    /// A weighted random choice among `weights` (route destinations); `None` when all are zero.
    pub fn pick_weighted(&self, weights: impl Iterator<Item = u32> + Clone) -> Option<usize> {
        keel_lb::pick_weighted(weights, &mut self.rng.borrow_mut())
    }

    /// Counts a downstream connection as open (see [`ActiveGuard`]; HTTP connections count
    /// themselves, to keep their state small).
    pub fn connection_opened(&self) {
        self.active.set(self.active.get() + 1);
    }

    /// Counts a downstream connection of `listener` as closed.
    pub fn connection_closed(&self, listener: &ListenerState) {
        self.active.set(self.active.get() - 1);
        listener.stats.slots[self.id].closed.inc();
        self.stats.per_worker[self.id].closed.inc();
    }

    /// Connections open on this worker.
    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Counts a failed upstream connect on listener `listener` and cluster `cluster` by its kind, and
    /// logs it (rate-limited).
    pub fn upstream_connect_failed(
        &self,
        listener: &ListenerRef,
        cluster: usize,
        endpoint: std::net::SocketAddr,
        e: &keel_io::ConnectError,
    ) {
        let lstats = listener.counters(self.id);
        let cstats = &listener.gen.clusters[cluster].slots[self.id];
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
            &listener.state.name,
            &listener.gen.snapshot.clusters[cluster].name,
            endpoint,
            e,
        );
    }

    /// Logs a refused downstream connection (TLS) under the same once-a-second limit as upstream
    /// problems: a scan or a flood of plaintext clients yields counters, not a log flood.
    pub fn warn_downstream(
        &self,
        listener: &str,
        peer: std::net::SocketAddr,
        what: &dyn std::fmt::Display,
    ) {
        if let Some(suppressed) = self.may_warn() {
            tracing::warn!(worker = self.id, listener, %peer, suppressed, "downstream {what}");
        }
    }

    /// Whether a rate-limited warning may be logged now, and how many were suppressed since the last.
    fn may_warn(&self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last_warning
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.last_warning.set(Some(now));
        Some(self.suppressed.replace(0))
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
        if let Some(suppressed) = self.may_warn() {
            tracing::warn!(worker = self.id, listener, cluster, %endpoint, suppressed, "upstream {what}");
        }
    }
}

/// A connection's listener: its lasting state, and the generation and index it is served with.
pub struct ListenerRef {
    pub gen: Rc<Generation>,
    pub state: Rc<ListenerState>,
    pub index: usize,
}

impl ListenerRef {
    /// The listener's config in this connection's generation.
    pub fn config(&self) -> &keel_config::Listener {
        &self.gen.snapshot.listeners[self.index]
    }

    /// This worker's counters for the listener.
    pub fn counters(&self, worker: usize) -> &ListenerCounters {
        &self.state.stats.slots[worker]
    }

    /// Moves a keep-alive connection onto the worker's current generation before its next
    /// request, when its listener is still there and still of the same protocol; otherwise the
    /// connection keeps the generation it has (and closes after the request, as its listener drains).
    pub fn refresh(&mut self, worker: &Worker) {
        let current = worker.current.borrow();
        if Rc::ptr_eq(&current, &self.gen) || !current.has_listener(&self.state) {
            return;
        }
        let index = self.state.index.get();
        if current.snapshot.listeners[index].protocol == self.config().protocol {
            self.gen = current.clone();
            self.index = index;
        }
    }
}

/// Counts a connection as open for as long as it lives; drain waits for these to reach zero.
pub struct ActiveGuard(Rc<Worker>, Rc<ListenerState>);

impl ActiveGuard {
    pub fn new(worker: &Rc<Worker>, listener: &Rc<ListenerState>) -> ActiveGuard {
        worker.connection_opened();
        ActiveGuard(worker.clone(), listener.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connection_closed(&self.1);
    }
}

/// Runs worker `worker` on its initial `sockets`, then follows its `control` channel for as long
/// as the process lives.
///
/// `ready` is told once every listener is registered with this worker's runtime.
pub async fn run(
    worker: Rc<Worker>,
    sockets: NamedSockets,
    mut control: UnboundedReceiver<Control>,
    ready: mpsc::Sender<Result<usize, String>>,
) {
    let acceptors = match register(&worker.current(), sockets) {
        Ok(a) => a,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {}: {e}", worker.id)));
            return;
        }
    };
    start_accepting(&worker, acceptors);
    monoio::spawn(sweep_idle(worker.clone()));
    let _ = ready.send(Ok(worker.id));
    let mut prepared: Option<(Rc<Generation>, Vec<Accepting>)> = None;
    while let Some(msg) = control.recv().await {
        match msg {
            Control::Prepare {
                snapshot,
                tls,
                table,
                sockets,
                reply,
            } => {
                let gen = Rc::new(Generation::new(
                    worker.id,
                    snapshot,
                    tls,
                    &table,
                    Some(&worker.current()),
                ));
                let result = register(&gen, sockets).map(|acceptors| {
                    prepared = Some((gen, acceptors));
                });
                let _ = reply.send(result.map_err(|e| format!("worker {}: {e}", worker.id)));
            }
            Control::Commit { reply } => {
                let result = match prepared.take() {
                    Some((gen, acceptors)) => {
                        commit(&worker, gen, acceptors);
                        Ok(())
                    }
                    None => Err(format!("worker {}: nothing prepared to commit", worker.id)),
                };
                let _ = reply.send(result);
            }
            Control::Abort => prepared = None,
            Control::Drain { scope, reply } => {
                let gen = worker.current();
                for (l, state) in gen.snapshot.listeners.iter().zip(&gen.listeners) {
                    if scope == DrainScope::All || l.direction == keel_config::Direction::Inbound {
                        state.drain();
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Control::Export { reply } => {
                let _ = reply.send(export(&worker));
            }
        }
    }
    // The process is going away: stop accepting everywhere and let connections finish.
    for state in &worker.current().listeners {
        state.drain();
    }
    while worker.active() > 0 {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::debug!(worker = worker.id, "worker drained");
}

/// Duplicates of this worker's listening sockets that still accept, by listener name.
fn export(worker: &Worker) -> Result<Vec<(String, OwnedFd)>, String> {
    let mut out = Vec::new();
    for (state, fd) in worker.listening.borrow().iter() {
        if state.is_draining() {
            continue;
        }
        // SAFETY: `fd` belongs to an acceptor whose loop is still running on this thread, so it is
        // open for the duration of this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
        let dup = borrowed.try_clone_to_owned().map_err(|e| {
            format!(
                "worker {}: cannot duplicate a listening socket: {e}",
                worker.id
            )
        })?;
        out.push((state.name.clone(), dup));
    }
    Ok(out)
}

/// A registered listening socket and the listener it belongs to.
type Accepting = (Rc<ListenerState>, keel_io::listener::Acceptor);

/// Registers `sockets` with this worker's runtime, each under its listener's state in `gen`.
fn register(gen: &Generation, sockets: NamedSockets) -> Result<Vec<Accepting>, String> {
    let mut out = Vec::with_capacity(sockets.len());
    for (name, socket) in sockets {
        let state = gen
            .listeners
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("no listener named {name} in the new config"))?;
        let acceptor = keel_io::listener::Acceptor::from_std(socket)
            .map_err(|e| format!("cannot register listener {name}: {e}"))?;
        set_defer_accept(gen, state, acceptor.raw_fd());
        out.push((state.clone(), acceptor));
    }
    Ok(out)
}

fn start_accepting(worker: &Rc<Worker>, acceptors: Vec<Accepting>) {
    for (state, acceptor) in acceptors {
        monoio::spawn(accept_loop(worker.clone(), state, acceptor));
    }
}

/// Whether listener `state` of `gen` waits for its clients' first bytes before accepting.
fn defers_accept(gen: &Generation, state: &ListenerState) -> bool {
    gen.snapshot
        .listeners
        .get(state.index.get())
        .is_some_and(|l| l.client_speaks_first())
}

/// Sets TCP_DEFER_ACCEPT on a listening socket as its listener in `gen` allows. A failure costs
/// only the saving (the accept path works either way), so it is logged, not fatal.
fn set_defer_accept(gen: &Generation, state: &ListenerState, fd: std::os::fd::RawFd) {
    if let Err(e) = keel_io::listener::set_defer_accept(fd, defers_accept(gen, state)) {
        tracing::debug!(listener = %state.name, error = %e, "TCP_DEFER_ACCEPT not set");
    }
}

/// Makes `gen` current: listeners it keeps carry on, new ones start accepting, removed ones drain;
/// idle upstream connections to endpoints no cluster names any more are closed.
fn commit(worker: &Rc<Worker>, gen: Rc<Generation>, acceptors: Vec<Accepting>) {
    gen.adopt_listeners();
    let old = worker.current.replace(gen.clone());
    for state in &old.listeners {
        if gen.has_listener(state) {
            continue;
        }
        // The same address as another kind of listener keeps its sockets; a removed one closes them.
        match gen.listeners.iter().find(|s| s.name == state.name) {
            Some(next) => state.hand_over_to(next.clone()),
            None => state.drain(),
        }
    }
    // Sockets carried over may now serve a listener of another protocol (a port redeclared TCP).
    for (state, fd) in worker.listening.borrow().iter() {
        let current = match state.successor() {
            Some(next) => next,
            None if gen.has_listener(state) => state.clone(),
            None => continue,
        };
        set_defer_accept(&gen, &current, *fd);
    }
    let endpoints: std::collections::HashSet<std::net::SocketAddr> = gen
        .snapshot
        .clusters
        .iter()
        .flat_map(|c| c.endpoints.iter().map(|e| e.address))
        .collect();
    worker
        .pool
        .borrow_mut()
        .retain(|addr| endpoints.contains(addr));
    worker
        .h2_pool
        .borrow_mut()
        .retain(|addr| endpoints.contains(addr));
    start_accepting(worker, acceptors);
}

/// Runs the worker's idle sweep every tick, counting each connection it closes.
async fn sweep_idle(worker: Rc<Worker>) {
    loop {
        monoio::time::sleep(crate::idle::TICK).await;
        worker.idle.sweep(|entry| {
            entry.listener.stats.slots[worker.id].idle_timeout.inc();
        });
        worker.pool.borrow_mut().release_for_waiters();
        worker.h2_pool.borrow_mut().release_for_waiters();
        worker.access.flush();
        crate::trace::flush();
        worker.metrics.publish(&worker.stats.istio[worker.id]);
        worker
            .metrics
            .publish_latency(&worker.stats.latency[worker.id]);
        let dropped = worker.access.take_dropped();
        if dropped > 0 {
            worker.stats.per_worker[worker.id]
                .access_log_dropped
                .add(dropped);
        }
    }
}

/// Starts serving a connection accepted on `at`'s listener. Plaintext connections of a declared
/// protocol go straight to their proxy; TLS, protocol detection and capture run in the
/// connection's own task first.
fn serve_accepted(
    worker: &Rc<Worker>,
    at: ListenerRef,
    stream: keel_io::Stream,
    peer: std::net::SocketAddr,
) {
    let listener = at.config();
    if matches!(listener.binding, keel_config::Binding::Capture(_)) {
        monoio::spawn(captured(worker.clone(), at, stream, peer));
        return;
    }
    if listener.tls.is_some() || listener.protocol == Protocol::Auto {
        monoio::spawn(secure_then_serve(worker.clone(), at, stream, peer));
        return;
    }
    let stream = Transport::Plain(stream);
    match listener.protocol {
        Protocol::Tcp => {
            monoio::spawn(tcp_proxy::handle(worker.clone(), at, stream, peer));
        }
        Protocol::Http | Protocol::Auto => {
            monoio::spawn(crate::http::proxy::serve(worker.clone(), at, stream, peer));
        }
    }
}

/// A connection of a capture port: served by the virtual listener its original destination
/// names, or by the capture listener itself (passthrough, or refused).
async fn captured(
    worker: Rc<Worker>,
    at: ListenerRef,
    stream: keel_io::Stream,
    peer: std::net::SocketAddr,
) {
    let listener = at.config();
    let keel_config::Binding::Capture(mode) = listener.binding else {
        return;
    };
    let lstats = at.counters(worker.id);
    let dst = match crate::capture::destination(stream.raw_fd(), mode) {
        Ok((dst, local))
            if !crate::capture::is_capture_port(&at.gen.snapshot, dst, Some(local)) =>
        {
            dst
        }
        Ok((dst, _)) => {
            lstats.capture_refused.inc();
            worker.warn_downstream(
                &listener.name,
                peer,
                &format!("connection to {dst} refused: the capture port was dialled directly, not reached by interception"),
            );
            return;
        }
        Err(e) => {
            lstats.capture_refused.inc();
            worker.warn_downstream(
                &listener.name,
                peer,
                &format!("connection refused: no original destination ({e}); the capture port was dialled directly"),
            );
            return;
        }
    };
    let at = match at.gen.virtual_listener(listener.direction, dst) {
        Some(index) => ListenerRef {
            state: at.gen.listeners[index].clone(),
            gen: at.gen.clone(),
            index,
        },
        None => at,
    };
    tracing::trace!(%peer, %dst, listener = %at.config().name, "captured");
    secure_then_serve(worker, at, stream, peer).await
}

/// A connection of a TLS listener or one of undeclared protocol: the handshake (or the
/// plaintext check), protocol detection, then the proxy.
async fn secure_then_serve(
    worker: Rc<Worker>,
    at: ListenerRef,
    stream: keel_io::Stream,
    peer: std::net::SocketAddr,
) {
    let started = std::time::Instant::now();
    let Some(stream) = crate::downstream_tls::secure(&worker, &at, stream, peer).await else {
        return;
    };
    let protocol = match at.config().protocol {
        Protocol::Auto => {
            let timeout = at
                .gen
                .snapshot
                .proxy
                .interception
                .as_ref()
                .map_or(Duration::from_millis(100), |i| i.detection_timeout);
            // A client already silent through PERMISSIVE's TLS check has used up the wait.
            let left = timeout.saturating_sub(started.elapsed());
            let (protocol, _) = crate::capture::detect(&stream, left).await;
            let lstats = at.counters(worker.id);
            match protocol {
                Protocol::Http => lstats.detected_http.inc(),
                _ => lstats.detected_tcp.inc(),
            }
            protocol
        }
        p => p,
    };
    match protocol {
        Protocol::Tcp => tcp_proxy::handle(worker, at, stream, peer).await,
        Protocol::Http | Protocol::Auto => {
            crate::http::proxy::serve(worker, at, stream, peer).await
        }
    }
}

async fn accept_loop(
    worker: Rc<Worker>,
    mut state: Rc<ListenerState>,
    listener: keel_io::listener::Acceptor,
) {
    let mut drain = state.drain_signal();
    let fd = listener.raw_fd();
    worker.listening.borrow_mut().push((state.clone(), fd));
    loop {
        // Wait for pending connections or for the drain; cancelling a readiness wait is harmless.
        let failed = monoio::select! {
            r = listener.readable() => r.is_err(),
            _ = drain.wait_for(|draining| *draining) => false,
        };
        if failed {
            break;
        }
        if state.is_draining() {
            match state.successor() {
                // Same address, another kind of listener: keep accepting, for it.
                Some(next) => {
                    for entry in worker.listening.borrow_mut().iter_mut() {
                        if entry.1 == fd && Rc::ptr_eq(&entry.0, &state) {
                            entry.0 = next.clone();
                        }
                    }
                    state = next;
                    drain = state.drain_signal();
                    continue;
                }
                None => break,
            }
        }
        // Take every connection waiting, then wait again.
        let deferred = defers_accept(&worker.current(), &state);
        loop {
            match listener.try_accept(deferred) {
                Ok((stream, peer)) => {
                    worker.stats.per_worker[worker.id].accepted.inc();
                    let at = ListenerRef {
                        gen: worker.current(),
                        state: state.clone(),
                        index: state.index.get(),
                    };
                    serve_accepted(&worker, at, stream, peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning, and say so.
                    tracing::warn!(worker = worker.id, listener = %state.name, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
    worker
        .listening
        .borrow_mut()
        .retain(|(s, f)| !(*f == fd && Rc::ptr_eq(s, &state)));
    tracing::debug!(worker = worker.id, listener = %state.name, "stopped accepting");
}
